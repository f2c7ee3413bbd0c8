"""The first hour of a user: every script answers --help, errors are one line from one process and come before
any work, and where a model, a dataset or a push goes wrong is said in words (cap_hf.cli.parser, cap_hf.io.sources,
cap_hf.io.hub.check_push)."""

import ast
import re
import runpy
import shutil
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, FakeHfApi, hub_error

from cap_hf.cli import parser as cli
from cap_hf.cli.parser import ArgumentParser, argparse_safe
from cap_hf.io import sources

SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("**/*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_the_users_scripts_stand_apart_from_the_benchmarks():
    """scripts/ holds what a user runs, scripts/bench/ the benchmarks and their helper."""
    assert {p.name for p in (ROOT / "scripts").glob("*.py")} == {
        "oneshot.py", "prepare_data.py", "prune.py", "push_to_hub.py", "structured_prune.py", "train_dense.py"}
    assert all(p.name.startswith("bench") for p in (ROOT / "scripts" / "bench").glob("*.py"))


def test_scripts_without_an_entry_point_are_helpers_of_the_others():
    helpers = sorted(set((ROOT / "scripts").glob("**/*.py")) - set(SCRIPTS))
    for helper in helpers:
        importers = [p.name for p in SCRIPTS if re.search(rf"^from {helper.stem} import|^import {helper.stem}\b",
                                                          p.read_text(), re.M)]
        assert importers, f"{helper.name} has no entry point and no script imports it"


@pytest.mark.parametrize("script", [str(p.relative_to(ROOT / "scripts")) for p in SCRIPTS] + ["-m model_cards"])
def test_every_script_answers_help(script, monkeypatch, capsys):
    """In process (the imports are shared), as `python scripts/X.py --help` runs it: exit 0 and a usage."""
    path = ROOT / "scripts" / script
    monkeypatch.syspath_prepend(str(path.parent))  # what running a script from its folder gives it
    if script.startswith("-m"):
        monkeypatch.setattr(sys, "argv", ["model_cards", "--help"])
        runner = lambda: runpy.run_module("model_cards", run_name="__main__")  # noqa: E731
    else:
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])
        runner = lambda: runpy.run_path(str(path), run_name="__main__")  # noqa: E731
    with pytest.raises(SystemExit) as stop:
        runner()
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


def test_prune_help_shows_the_flags_with_a_percent_sign(capsys, monkeypatch):
    """A bare '%' in a help string (max_memory_gb's '90% of it') crashed argparse's --help."""
    from conftest import load_script

    with pytest.raises(SystemExit):
        load_script("prune").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "90% of it" in out and "--max_memory_gb" in out and "offline demo" in out


def test_help_strings_are_made_safe_for_argparse(capsys):
    assert argparse_safe("within 90% of it, %(default)s, 100%% sure") == "within 90%% of it, %(default)s, 100%% sure"
    parser = ArgumentParser(prog="p")
    parser.add_argument("--x", default=3, help="at most 50% of x (default %(default)s)")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "at most 50% of x (default 3)" in capsys.readouterr().out


def test_a_usage_error_is_one_line_and_said_by_the_main_process_only(capsys, monkeypatch):
    parser = ArgumentParser(prog="python scripts/x.py")
    parser.add_argument("--x", required=True)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--y", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "usage:" not in err
    assert err.startswith("error: ") and "Run `python scripts/x.py --help`" in err
    # another process of `accelerate launch`: it leaves the error to the main process, which the launcher stops
    # it for; still running after QUIET_SECONDS, the error was its own, and it says so with its rank
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    waited = []
    monkeypatch.setattr("cap_hf.cli.parser.time.sleep", waited.append)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert waited == [cli.QUIET_SECONDS]
    assert capsys.readouterr().err.startswith("error (process 1): the following arguments are required: --x")


def test_an_error_before_any_work_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "scripts/oneshot.py", "--model_name_or_path", str(tmp_path / "nothing"),
                             "--dataset_name", "builtin:digits", "--output_dir", str(tmp_path / "out")], env=ENV,
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: model folder '{tmp_path / 'nothing'}' does not exist. Pass "
                                                      "a folder written by save_pretrained (e.g. by "
                                                      "scripts/train_dense.py) or a Hub model id.")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_under_accelerate_launch_an_error_is_said_once(tmp_path):
    """Two processes stop on the same bad input; the main process alone says why (a usage error too)."""
    launch = ["accelerate", "launch", "-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/oneshot.py"]
    for extra, message in ((["--model_name_or_path", "no-such/model-xyz"], "model 'no-such/model-xyz' not found"),
                           (["--model_name_or_path", "m", "--no_such_flag", "1"], "unrecognized arguments")):
        result = subprocess.run([*launch, *extra, "--dataset_name", "builtin:digits", "--output_dir", str(tmp_path)],
                                env=ENV, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode != 0
        assert result.stderr.count(message) == 1, result.stderr[-3000:]
        assert "usage:" not in result.stderr


# ---- where a model or a dataset comes from -------------------------------------------------------------------


def test_names_that_are_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("./x", "/abs/x", "~/x", "data/no-such-folder", "a/b/c", "bad name", "C:\\data"):
        assert sources.looks_like_path(name), name
    for name in ("facebook/deit-small-patch16-224", "ILSVRC/imagenet-1k", "mnist"):
        assert not sources.looks_like_path(name), name
    with pytest.raises(sources.SourceError, match="dataset folder 'data/no-such-folder' does not exist"):
        sources.check_dataset_source("data/no-such-folder")
    with pytest.raises(sources.SourceError, match="dataset folder '/abs/missing' does not exist"):
        sources.check_dataset_source("/abs/missing")
    sources.check_dataset_source("data")  # a folder
    sources.check_dataset_source("builtin:digits")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.SourceError, match="'empty' has no config.json"):
        sources.check_model_source("empty")


def test_a_hub_id_that_is_not_there(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    # offline: said at once, with the offline mode named
    with pytest.raises(sources.SourceError, match=r"model 'no-such/model' not found locally or on the Hub.*"
                                                  r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        sources.check_model_source("no-such/model")
    # cached: nothing to ask
    (tmp_path / "models--cached--model").mkdir()
    sources.check_model_source("cached/model")
    # online: one request, its answer in words (the Hub played by a test double)
    monkeypatch.setattr(sources, "hub_offline", lambda: False)

    class Hub:
        def __init__(self, error):
            self.error, self.calls = error, 0

        def auth_check(self, repo_id, repo_type=None, token=None):
            self.calls += 1
            if self.error is not None:
                raise self.error

    for error, message in ((hub_error("RepositoryNotFoundError", 404), "not found locally or on the Hub: no such "
                                                                       "folder here, and no such repository"),
                           (hub_error("GatedRepoError", 403), "is gated on the Hub"),
                           (ConnectionError("Name or service not known"), "could not reach the Hub")):
        hub = Hub(error)
        with pytest.raises(sources.SourceError, match=message):
            sources.check_dataset_source("someone/data", api=hub)
        assert hub.calls == 1  # no retry loop
    sources.check_model_source("someone/model", api=Hub(None))


# ---- what a push needs, checked before the work ---------------------------------------------------------------


class Args:
    def __init__(self, repo_id="me/model", token=None):
        self.push_to_hub, self.hub_model_id, self.hub_token = True, repo_id, token


@pytest.mark.parametrize(("whoami", "repo_id", "message"), [
    ({"name": "me", "orgs": [], "auth": {"accessToken": {"role": "read"}}}, "me/m", "the token is read-only"),
    ({"name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}}, "other-org/m",
     "'me', who is not a member of 'other-org'"),
    ({"name": "me", "orgs": [{"name": "lab", "roleInOrg": "read"}], "auth": {"accessToken": {"role": "write"}}},
     "lab/m", "read role in the organisation 'lab'"),
    ({"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": {
        "role": "fineGrained", "fineGrained": {"scoped": [{"entity": {"type": "user", "name": "me"},
                                                            "permissions": ["repo.write"]}]}}}},
     "lab/m", "no 'repo.write' permission on 'lab'"),
])
def test_push_check_refuses_a_token_that_cannot_write(whoami, repo_id, message):
    from cap_hf.io.hub import HubError, check_push

    with pytest.raises(HubError, match=message):
        check_push(Args(repo_id), FakeHfApi(whoami=whoami))


def test_push_check_asks_the_hub_once_for_the_token_and_once_for_the_repo():
    from huggingface_hub.errors import LocalTokenNotFoundError

    from cap_hf.io.hub import HubError, check_push

    api = FakeHfApi()
    args = Args("me/new-model")
    assert check_push(args, api) == "me/new-model" and args.push_to_hub is False  # Trainer's own push is off
    assert [c[0] for c in api.calls] == ["whoami", "auth_check"]
    fine = FakeHfApi(whoami={"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": {
        "role": "fineGrained", "fineGrained": {"scoped": [{"entity": {"name": "lab"}, "permissions": ["repo.write"]}]}}}})
    check_push(Args("lab/m"), fine)
    with pytest.raises(HubError, match="No Hugging Face token.*hf auth login"):
        check_push(Args(), FakeHfApi(whoami=LocalTokenNotFoundError("no token")))
    with pytest.raises(HubError, match="refused the token"):
        check_push(Args(), FakeHfApi(whoami=hub_error("HfHubHTTPError", 401)))
    with pytest.raises(HubError, match="Could not reach the Hub"):
        check_push(Args(), FakeHfApi(whoami=ConnectionError("Name or service not known")))
    with pytest.raises(HubError, match="exists on the Hub and this token may not write to it"):
        check_push(Args("me/theirs"), FakeHfApi(existing={"me/theirs": False}))
    check_push(Args("me/mine"), FakeHfApi(existing={"me/mine": True}))


# ---- what the base install gives ------------------------------------------------------------------------------


def _imports(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_the_base_install_has_what_the_library_and_the_user_scripts_import_and_nothing_unused():
    """`pip install -e .` alone runs the demo and every user script (the [dev] extra only adds tests and lint),
    and every declared dependency is used."""
    import importlib.metadata

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    code = [p for folder in ("cap_hf", "trainer_plugins", "model_cards") for p in (ROOT / folder).rglob("*.py")]
    code += [p for p in SCRIPTS if not p.name.startswith("bench")]
    ours = {"cap_hf", "trainer_plugins", "model_cards", "conftest", "benchlib"}
    distributions = importlib.metadata.packages_distributions()
    needed = set()
    # imported only where they import, never required: torchvision (the training augmentation's v2 backend,
    # cap_hf.io.data.torchvision_transforms; a user installs the release built for their torch, which no range
    # in pyproject can name)
    optional = {"torchvision"}
    for module in _imports(code) - ours - optional - set(sys.stdlib_module_names):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert names & declared, f"{module} is imported by the library or a user script but not a base dependency"
        needed |= names & declared
    # needed through another package that leaves them optional: jinja2 (huggingface_hub's ModelCard templates),
    # pillow (datasets' Image feature, the PIL image processors)
    unused = declared - needed - {"jinja2", "pillow"}
    assert not unused, f"declared but never imported: {sorted(unused)}"
