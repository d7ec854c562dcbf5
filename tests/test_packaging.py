"""The two dependency lists (pyproject.toml for pip, environment.yml for conda) agree."""
import re
import tomllib

import yaml

from backfill_utils import config as C

CONDA_TO_PIP = {"pytorch": "torch"}
NOT_PACKAGES = {"python", "pip"}


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, req
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((C.REPO_ROOT / "pyproject.toml").read_text())
    pip_deps = dict(_split(r) for r in pyproject["project"]["dependencies"])
    env = yaml.safe_load((C.REPO_ROOT / "environment.yml").read_text())
    conda_deps = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):  # the pip: sub-list installs the package itself
            assert dep.get("pip") == ["-e ."], dep
            continue
        name, spec = _split(dep)
        if name in NOT_PACKAGES:
            continue
        conda_deps[CONDA_TO_PIP.get(name, name)] = spec
    assert conda_deps == pip_deps


def test_constraints_pin_a_matching_torch_pair():
    pins = dict(
        line.split("==") for line in (C.REPO_ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(pins) == {"torch", "torchvision"}
    # torchvision 0.(N+15) is built against torch 2.N
    torch_minor = int(pins["torch"].split(".")[1])
    tv_minor = int(pins["torchvision"].split(".")[1])
    assert tv_minor == torch_minor + 15


def test_torchvision_imports_with_its_compiled_ops():
    import torch
    import torchvision
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.01]])
    keep = nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]
    assert torchvision.__version__
