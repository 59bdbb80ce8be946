"""README.md and docs/*.md (issue 25): every number is generated from reports/ (dfpipe.docs) and every shell block
runs. A block whose info string says ```bash runnable is run, in page order, in a copy of the repository where a tiny
demo DAG has been trained (what `make repro` leaves, in seconds); any other shell block must say, in an HTML comment
just above it, which tests cover it instead. So a dead example fails CI."""

import dataclasses
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dfpipe.docs import blocks, pages, sync, sync_all
from dfpipe.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PAGES = pages(REPO)
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
SHELLS = {"bash", "sh", "shell", "console"}
NOTE = re.compile(r"<!--(?P<text>(?:(?!-->).)*)-->\s*$", re.S)
BLOCK_TIMEOUT_S = 900  # generous: a block retrains a tiny expert and reruns two stages; seconds on an idle machine,
# minutes on two cores shared with other work
MARK = "@@docs-command"


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int
    info: str
    body: str
    note: str  # the HTML comment just above the fence ("" if none)

    @property
    def runnable(self) -> bool:
        return "runnable" in self.info.split()[1:]

    @property
    def where(self) -> str:
        name = f"docs/{self.page.name}" if self.page.parent.name == "docs" else self.page.name
        return f"{name}:{self.line}"


def shell_blocks(page: Path) -> list[Block]:
    """The fenced shell blocks of ``page`` (```bash, ```sh ...), in order."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        lang = (m["info"].split() or [""])[0]
        if lang in SHELLS:
            note = NOTE.search(text, 0, m.start())
            out.append(Block(page, text.count("\n", 0, m.start()) + 1, m["info"].strip(), m["body"],
                             note["text"].strip() if note else ""))
    return out


def commands(body: str) -> list[str]:
    """The commands of a block: continuation lines joined, blank and comment-only lines dropped."""
    out, cur = [], ""
    for line in body.splitlines():
        cur += line
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def run_block(block: Block, cwd: Path, env: dict, timeout: float = BLOCK_TIMEOUT_S) -> list[tuple[str, str]]:
    """Run the block's commands in one bash (so `source` carries over), stopping at the first failure; returns
    (command, its output) for each command run. A failing command or a timeout fails the test, naming the block."""
    cmds = commands(block.body)
    script = "set -eo pipefail\n" + "".join(f"echo '{MARK} {i}'\n{c}\n" for i, c in enumerate(cmds))
    try:
        res = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
        pytest.fail(f"{block.where}: timed out after {timeout} s:\n{out[-4000:]}")
    parts = re.split(rf"^{MARK} (\d+)\n", res.stdout, flags=re.M)
    ran = [(cmds[int(i)], out) for i, out in zip(parts[1::2], parts[2::2])]
    if res.returncode != 0:
        cmd, out = ran[-1] if ran else ("(before the first command)", res.stdout)
        pytest.fail(f"{block.where}: `{cmd}` exited {res.returncode}:\n{out[-4000:]}")
    return ran


def did_nothing(cmd: str, out: str) -> bool:
    """A `dvc repro` / `dvc exp run` that ran no stage: the issue's dead examples (an unchanged stage is skipped)."""
    return bool(re.match(r"dvc (repro|exp run)\b", cmd)) and "Running stage" not in out


def _lookup(params: dict, key: str):
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_problems(cmd: str, params: dict) -> list[str]:
    """Why the `-S key=value` of a `dvc exp run` command would change nothing (the value is already the default) or
    fail (no such key in params.yaml)."""
    if not cmd.startswith("dvc exp run"):
        return []
    words = shlex.split(cmd, comments=True)
    out = []
    for flag, arg in zip(words, words[1:]):
        if flag not in ("-S", "--set-param"):
            continue
        key, _, value = arg.partition("=")
        try:
            now = _lookup(params, key)
        except KeyError:
            out.append(f"-S {arg}: params.yaml has no {key}")
            continue
        if yaml.safe_load(value) == now:
            out.append(f"-S {arg}: {key} is already {now!r}: the experiment would change nothing")
    return out


ALL_BLOCKS = [b for p in PAGES for b in shell_blocks(p)]
RUNNABLE = [b for b in ALL_BLOCKS if b.runnable]


# ----------------------------------------------------------------------------- numbers come from reports/
def test_every_generated_number_on_every_page_equals_its_report():
    """Issue 25: no README or docs number differs from reports/ (`make docs` rewrites them)."""
    assert sum(len(blocks(p)) for p in PAGES) >= 20  # the pages really do hold generated blocks
    assert sync_all(REPO, check=True) == {}, "stale: run `make docs` (python -m dfpipe.docs)"


def test_value_cell_and_table_blocks_are_rewritten_from_their_sources(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "m.json").write_text('{"val": {"auc": 0.7234, "n": 1200, "runs": [{"s": 2.5}]}, "a.b": 0.5}')
    (tmp_path / "r" / "t.md").write_text("intro\n\n| set | AUC |\n|---|---|\n| test | 0.649 [0.52, 0.77] |\n\n"
                                         "### summary\n\n| recipe | cell |\n|---|---|\n"
                                         "| base | 0.843 / 0.605 (0.724) |\n")
    page = tmp_path / "README.md"
    text = ("AUC <!-- value: r/m.json val.auc .3f -->0.700<!-- /value --> on "
            "<!-- value: r/m.json val.n , -->1200<!-- /value --> images, "
            "<!-- value: r/m.json val.runs.0.s -->2.5<!-- /value --> s, "
            "<!-- value: r/m.json a.b .0% -->50%<!-- /value -->; mean "
            '<!-- cell: r/t.md "### summary" "base" "cell" #2 -->0.7<!-- /cell -->\n'
            "<!-- table: r/t.md -->\n| set | AUC |\n|---|---|\n| test | 0.6 |\n<!-- /table -->\nend\n")
    page.write_text(text)
    assert sync(page, check=True) == ["r/t.md", "r/m.json val.auc", "r/m.json val.n",
                                      'r/t.md "### summary" "base" "cell" #2'] and page.read_text() == text
    assert sync(page) != []
    assert page.read_text() == (text.replace("0.700", "0.723").replace("1200<", "1,200<")
                                .replace("#2 -->0.7<", "#2 -->0.724<")
                                .replace("| test | 0.6 |", "| test | 0.649 [0.52, 0.77] |"))
    assert sync(page, check=True) == []


@pytest.mark.parametrize("block, message", [
    ("<!-- value: r/none.json a .3f -->1<!-- /value -->",
     r"README.md: block r/none.json a: .*none.json does not exist"),
    ("<!-- value: r/m.json val.nope .3f -->1<!-- /value -->", r"README.md: block r/m.json val.nope: no key 'nope'"),
    ("<!-- value: r/m.json val .3f -->1<!-- /value -->", r"is a dict, not a value"),
    ('<!-- cell: r/t.md "### summary" "base" "nope" -->1<!-- /cell -->', r"no column 'nope'"),
    ('<!-- cell: r/t.md "### summary" "other" "cell" -->1<!-- /cell -->', r"no row 'other'"),
    ('<!-- cell: r/t.md "### nowhere" "base" "cell" -->1<!-- /cell -->', r"no line starting with '### nowhere'"),
    ("<!-- value: r/m.json val.auc .3f -->0.723\n", r"README.md:1: a value block without its closing"),
])
def test_a_block_pointing_at_nothing_is_an_error_naming_the_page(tmp_path, block, message):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "m.json").write_text('{"val": {"auc": 0.7234}}')
    (tmp_path / "r" / "t.md").write_text("### summary\n\n| recipe | cell |\n|---|---|\n| base | 0.5 |\n")
    (tmp_path / "README.md").write_text(block)
    with pytest.raises(InputError, match=message):
        sync(tmp_path / "README.md", check=True)


def test_the_benchmark_readme_command_checks_every_page():
    res = subprocess.run([sys.executable, "bench/benchmark.py", "readme", "--check"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr


def test_the_readme_types_no_result_number_by_hand():
    """Every decimal number of the README (a score, a rate) sits in a generated block; only a version and the
    confidence level are typed (the README before issue 25 held 268 such numbers)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    bare = re.sub(r"<!-- (value|cell): .*?<!-- /\1 -->", "", text)
    bare = re.sub(r"<!-- (benchmark-table|table): .*?<!-- /\1 -->", "", bare, flags=re.S)
    typed = [n for n in re.findall(r"\d*\.\d+%?|\d+%", bare) if n not in ("3.11", "95%")]  # Python; the CI's level
    assert not typed, f"README.md: numbers typed by hand (use a <!-- value/cell --> block): {typed}"


# ----------------------------------------------------------------------------- the front page
def test_the_first_screen_scores_your_own_image_in_at_most_three_commands():
    """Issue 25 target: a fresh clone, following only the README's first screen, scores its own image."""
    readme = REPO / "README.md"
    lines = readme.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 120, f"README.md: {len(lines)} lines (a front page: at most ~120)"
    first = [b for b in shell_blocks(readme) if b.line <= 40]
    upto = next(i for i, b in enumerate(first) if "dfpipe predict" in b.body)
    assert first[upto].runnable  # the scoring command itself is run by test_runnable_blocks_run
    assert sum(len(commands(b.body)) for b in first[:upto + 1]) <= 3
    screen = "\n".join(lines[:40]).lower()
    assert "synthetic" in screen and "not a detector" in screen  # no promise of detection quality
    assert "prediction.txt" in readme.read_text()


# ----------------------------------------------------------------------------- examples that work
def test_every_shell_block_runs_or_names_the_tests_that_cover_it():
    assert len(RUNNABLE) >= 3
    for b in ALL_BLOCKS:
        if b.runnable:
            continue
        named = re.findall(r"tests/test_\w+\.py", b.note)
        assert b.note.startswith("not runnable") and named, \
            f"{b.where}: a shell block that is not runnable needs <!-- not runnable here: why; tests/test_x.py ... -->"
        missing = [n for n in named if not (REPO / n).is_file()]
        assert not missing, f"{b.where}: names {missing}, which do not exist"


def test_no_example_sets_a_param_to_the_value_it_already_has():
    """Issue 25: `dvc exp run -S ...loss.ce=...` with the default value ran nothing new. Every -S of every block must
    name a params.yaml key and change it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set_problems("dvc exp run -S 'train_experts.experts.lite0_a.loss.ce=1.0'", params)  # the dead example
    assert set_problems("dvc exp run -S train_experts.experts.lite0_a.nope=1", params)
    assert not set_problems("dvc exp run -S train_experts.experts.lite0_a.lr=0.001", params)
    problems = [f"{b.where}: {p}" for b in ALL_BLOCKS for c in commands(b.body) for p in set_problems(c, params)]
    assert not problems, problems


def test_the_runner_fails_a_failing_command_and_flags_a_repro_that_ran_nothing(tmp_path):
    page = tmp_path / "docs" / "x.md"
    ok = Block(page, 3, "bash runnable", "export X=1\necho one \\\n  $X\n# a comment\n", "")
    assert run_block(ok, tmp_path, dict(os.environ)) == [("export X=1", ""), ("echo one    $X", "one 1\n")]
    with pytest.raises(pytest.fail.Exception, match=r"docs/x.md:3: `false` exited 1"):
        run_block(Block(page, 3, "bash runnable", "true\nfalse\necho never\n", ""), tmp_path, dict(os.environ))
    assert did_nothing("dvc repro train_experts@lite0_a", "Stage 'train_experts@lite0_a' didn't change, skipping\n")
    assert not did_nothing("dvc repro -s -f train_experts@lite0_a", "Running stage 'train_experts@lite0_a':\n")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A copy of the repository as `make repro` leaves it, at a tiny size: demo data, every stage run (in this
    process: seconds), recorded by `dvc commit`, all committed to git; `.venv` is this interpreter's environment.
    Plus the files the pages assume: `my_photo.jpg` and a folder `photos/`. Returns (root, environment)."""
    from dfpipe.config import STAGE_CONFIGS, load_section
    from dfpipe.demo import make_demo_dataset
    from dfpipe.layout import Layout

    if not (Path(sys.prefix) / "bin" / "dfpipe").is_file():
        pytest.fail(f"{sys.prefix}: no dfpipe command in this environment (make setup installs it)")
    work = tmp_path_factory.mktemp("docs") / "repo"
    work.mkdir()
    scripts = [p.name for p in REPO.glob("0*_*.py")]
    for item in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "dfpipe", *scripts):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / item)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare_data"].update(workers=1)
    params["augment_sd"].update(workers=1)
    # timm's tiny test network, untrained, for the embedder and the experts: the commands run as on the demo, in
    # a fraction of the time (loading and converting the bundled ImageNet weights dominated)
    tiny = dict(backbone="test_efficientnet", pretrained="none")
    params["cluster_split"].update(img_size=48, n_clusters=2, n_folds=2, **tiny)
    for e in params["train_experts"]["experts"].values():
        e.update(img_size=48, epochs=1, batch_size=16, **tiny)
    params["train_experts"]["workers"] = 0
    params["evaluate"].update(degradations=["jpeg50"], bootstrap=50, workers=0)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_demo_dataset(work / "data" / "raw", seed=0, n_train=32, n_val=12, n_test=8, size_range=(64, 80))
    test_images = sorted((work / "data" / "raw" / "testset").iterdir())
    shutil.copy(test_images[0], work / "my_photo.jpg")
    (work / "photos" / "sub").mkdir(parents=True)
    for i, p in enumerate(test_images[1:4]):
        shutil.copy(p, work / "photos" / ("sub" if i else "") / p.name)
    (work / ".venv").symlink_to(sys.prefix)

    env = {**os.environ, "PYTHONPATH": str(work), "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "docs", "GIT_AUTHOR_EMAIL": "docs@example.org", "GIT_COMMITTER_NAME": "docs",
           "GIT_COMMITTER_EMAIL": "docs@example.org"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for name in STAGE_CONFIGS:  # the DAG's order
            importlib.import_module(f"dfpipe.{name}").run(load_section(STAGE_CONFIGS[name], name), Layout.load())

    def sh(*cmd: str) -> None:
        res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout}\n{res.stderr}"

    sh("git", "init", "-q")
    (work / ".git" / "info" / "exclude").write_text(".venv\n")  # a symlink: the .gitignore's `.venv/` misses it
    sh("git", "config", "user.name", "docs")  # dvc exp run commits: an identity even where git has none
    sh("git", "config", "user.email", "docs@example.org")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh(sys.executable, "-m", "dvc", "commit", "-f", "-q")  # the stages' outputs, as if `dvc repro` had made them
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "the tiny demo DAG")
    return work, env


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_runnable_blocks_run(sandbox, block):
    """Each block marked runnable, in page order, exits 0 in the trained sandbox; a `dvc repro` or `dvc exp run` in
    one must run a stage (an example that is skipped as unchanged does not do what its comment says)."""
    work, env = sandbox
    for cmd, out in run_block(block, work, env):
        assert not did_nothing(cmd, out), f"{block.where}: `{cmd}` ran no stage:\n{out[-2000:]}"
        if cmd.split()[:2] in (["dfpipe", "predict"], [".venv/bin/dfpipe", "predict"]):
            assert "my_photo.jpg" in out and re.search(r"likely real|uncertain|likely fake", out), out
