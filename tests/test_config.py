import pytest

from backfill_utils import config as C


def test_profiles_exist_and_load():
    assert {"smoke", "default", "paper"} <= set(C.available_profiles())
    for name in ("smoke", "default", "paper"):
        cfg = C.load_profile(name)
        assert cfg["profile"] == name
        assert cfg["embedding_dim"] > 0


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv(C.PROFILE_ENV, "smoke")
    assert C.load_profile()["profile"] == "smoke"
    assert C.load_profile("default")["profile"] == "default"


def test_unknown_profile_lists_available():
    with pytest.raises(FileNotFoundError, match="available profiles: .*smoke"):
        C.load_profile("no-such-profile")


def test_override_typo_is_an_error():
    with pytest.raises(KeyError, match="epoch"):
        C.load_profile("smoke", train={"epoch": 3})
    cfg = C.load_profile("smoke", train={"epochs": 7}, dataset_options={"anything": 1})
    assert cfg["train"]["epochs"] == 7 and cfg["train"]["lr"] == 0.1
    assert cfg["dataset_options"]["anything"] == 1


def test_paths_do_not_depend_on_working_directory(tmp_path, monkeypatch):
    before = (C.REPO_ROOT, C.cache_dir())
    monkeypatch.chdir(tmp_path)
    assert (C.REPO_ROOT, C.cache_dir()) == before
    assert (C.REPO_ROOT / "backfill_utils" / "config.py").is_file()


def test_config_hash_is_stable_and_sensitive():
    a = {"x": 1, "y": {"z": [1, 2]}}
    assert C.config_hash(a) == C.config_hash({"y": {"z": [1, 2]}, "x": 1})
    assert C.config_hash(a) != C.config_hash({"x": 1, "y": {"z": [2, 1]}})
