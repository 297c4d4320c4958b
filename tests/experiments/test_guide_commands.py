"""Every shell command of the user's guide (docs/experiment_commands_guide.ja.md) works as
written: the experiment commands parse with run_real_experiments.py's flags, their `tee` log
directory exists in a fresh clone, and the result checks (`ls`, `cat … | jq …`) print
non-empty, non-null output on the results of a real run (`tiny`, configs/smoke.json).

Where `jq` is not installed the jq expressions are evaluated by `jq_eval` below (the forms the
guide uses: `.`, `.key`, `.["key"]`, chained)."""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "experiment_commands_guide.ja.md"
ENTRY = "python experiments/run_real_experiments.py"


def guide_commands(text: str) -> list[str]:
    """Shell commands of the Markdown's code blocks: continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


COMMANDS = guide_commands(GUIDE.read_text(encoding="utf-8"))
EXPERIMENTS = [c for c in COMMANDS if c.startswith(ENTRY)]
CHECKS = [c for c in COMMANDS if not c.startswith(ENTRY)]


def split_pipeline(command: str) -> tuple[list[str], str | None]:
    """(argv of the python part, tee target or None) of an experiment command."""
    python_part, _, tail = command.partition(" 2>&1 | tee ")
    return shlex.split(python_part)[2:], (tail.strip() or None)


def test_the_guide_has_the_commands_we_check():
    assert len(EXPERIMENTS) == 13 and len(CHECKS) == 4, COMMANDS
    assert all(c.startswith(("ls ", "cat ")) for c in CHECKS), CHECKS
    assert {split_pipeline(c)[1] for c in EXPERIMENTS} == {None, "logs/full_mistral-7b.log",
                                                            "logs/full_all_models.log"}


PARSE = r"""
import json, sys
sys.argv = ["run_real_experiments.py"]
sys.path.insert(0, REPO)
import experiments.run_real_experiments as r
out = []
for argv in json.load(sys.stdin):
    r.FLAGS.unparse_flags()
    rest = r.FLAGS(["run_real_experiments.py"] + argv)  # raises on an unknown flag or bad value
    out.append({"rest": rest[1:], **{k: getattr(r.FLAGS, k) for k in ("mode", "model", "experiment")}})
print(json.dumps(out))
"""


def test_every_experiment_command_parses_with_our_flags():
    argvs = [split_pipeline(c)[0] for c in EXPERIMENTS]
    proc = subprocess.run([sys.executable, "-c", f"REPO = {str(REPO)!r}\n" + PARSE],
                          input=json.dumps(argvs), capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    from experiments.runner import MODEL_GROUPS
    from sst_jax.models import PRESETS

    for argv, got in zip(argvs, parsed):
        want = dict(zip(argv[0::2], argv[1::2]))
        assert got["rest"] == [], argv
        assert {f"--{k}": got[k] for k in ("mode", "model", "experiment")} == want, argv
        assert got["model"] in PRESETS or got["model"] in MODEL_GROUPS, argv


def test_the_tee_log_directory_exists_in_a_fresh_clone():
    targets = {split_pipeline(c)[1] for c in EXPERIMENTS} - {None}
    for target in targets:
        directory = (REPO / target).parent
        assert directory.is_dir() and os.access(directory, os.W_OK), target
    keep = REPO / "logs" / ".gitignore"
    assert keep.read_text().split() == ["*", "!.gitignore"]
    if shutil.which("git") and (REPO / ".git").exists():  # the placeholder must be committable
        ignored = subprocess.run(["git", "check-ignore", "-q", str(keep)], cwd=REPO)
        assert ignored.returncode == 1, "logs/.gitignore is git-ignored: a clone would lack logs/"


# --- result checks ----------------------------------------------------------------------------

_TOKEN = re.compile(r'\.?\["((?:[^"\\]|\\.)*)"\]|\.([A-Za-z_][A-Za-z0-9_]*)|\.')


def jq_eval(expression: str, document):
    """The jq path expressions the guide uses: `.`, `.key`, `.["key"]`, chained; a missing
    key is null, as in jq."""
    pos, value = 0, document
    expression = expression.strip()
    while pos < len(expression):
        m = _TOKEN.match(expression, pos)
        if not m or m.end() == pos:
            raise ValueError(f"jq expression {expression!r}: unsupported at {expression[pos:]!r}")
        key = m.group(1) if m.group(1) is not None else m.group(2)
        if key is not None:
            key = json.loads(f'"{key}"') if m.group(1) is not None else key
            value = value.get(key) if isinstance(value, dict) else None
        pos = m.end()
    return value


def run_check(command: str, cwd: Path) -> list:
    """Run a result check; jq's output as a list of JSON documents (for `ls`: its lines)."""
    if "| jq " not in command:
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stdout.splitlines() if line.strip()]
    if shutil.which("jq"):
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return _json_stream(proc.stdout)
    cat_part, _, jq_part = command.partition("| jq ")
    files = sorted(f for pattern in shlex.split(cat_part)[1:] for f in glob.glob(str(cwd / pattern)))
    (expression,) = shlex.split(jq_part)
    return [jq_eval(expression, json.loads(Path(f).read_text())) for f in files]


def _json_stream(text: str) -> list:
    decoder, pos, docs = json.JSONDecoder(), 0, []
    while pos < len(text.rstrip()):
        while text[pos].isspace():
            pos += 1
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
    return docs


@pytest.mark.parametrize("command", CHECKS)
def test_result_check_prints_non_null_output(command, tiny_run):
    root = tiny_run[0]
    output = run_check(command, root)
    assert output, f"{command}: no output"
    assert all(doc is not None for doc in output), f"{command}: printed null"
    if command.startswith("ls "):
        listing = "\n".join(output)
        for exp in ("exp1", "exp2", "exp3"):
            assert f"{exp}_results_tiny_minimal_" in listing, listing
    if '"SST-Merge"' in command:  # the method's summary, with intervals and its α-sweep front
        for entry in output:
            assert entry["method"] == "sst" and entry["hypervolume"] is not None
            assert {"value", "low", "high", "n"} <= set(entry["best"]["refusal"])
            assert entry["sweep"] and entry["pareto_alphas"]


def test_jq_eval_matches_the_forms_the_guide_uses():
    doc = {"SST-Merge": {"best": {"alpha": 1.0}}, "a": {"b": [1]}, "x y": 2}
    assert jq_eval(".", doc) is doc
    assert jq_eval('.["SST-Merge"]', doc) == {"best": {"alpha": 1.0}}
    assert jq_eval('.["SST-Merge"]["best"].alpha', doc) == 1.0
    assert jq_eval(".a.b", doc) == [1] and jq_eval('.["x y"]', doc) == 2
    assert jq_eval('.["missing"]', doc) is None and jq_eval(".a.missing.deeper", doc) is None


@pytest.mark.skipif(not shutil.which("jq"), reason="jq not installed")
def test_jq_eval_agrees_with_jq(tiny_run):
    for command in (c for c in CHECKS if "| jq " in c):
        cat_part, _, jq_part = command.partition("| jq ")
        (expression,) = shlex.split(jq_part)
        for f in sorted(glob.glob(str(tiny_run[0] / shlex.split(cat_part)[1]))):
            proc = subprocess.run(["jq", expression, f], capture_output=True, text=True, check=True)
            assert _json_stream(proc.stdout) == [jq_eval(expression, json.loads(Path(f).read_text()))]


def test_a_hub_model_offline_fails_in_one_line_pointing_to_the_embedded_model(tmp_path):
    """`--model mistral-7b` without network and without the checkpoint cached: one line that
    says so and names `--model smollm2-135m`, no traceback."""
    argv, _ = split_pipeline(EXPERIMENTS[0])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run_real_experiments.py"), *argv,
                           "--output_dir", str(tmp_path / "results")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "mistral" in last.lower() and "--model smollm2-135m" in last, last


# --- headline entries (experiments/headlines.py), straight from the run's payloads ------------


def test_headline_entries_cover_exactly_the_methods_that_ran(tiny_run):
    from experiments.headlines import headline_entries, headline_name

    payloads = tiny_run[2]
    ran = {"exp1": {n.split("@")[0] for n in payloads["exp1"]["results"]["0"]["safety_tax"]},
           "exp2": set(payloads["exp2"]["results"]["0"]["results"]["2"]["methods"]),
           "exp3": {r["method"] for r in payloads["exp3"]["results"]["0"]["rows"]}}
    for exp, payload in payloads.items():
        entries = headline_entries(exp, {k: v for k, v in payload.items() if k in (
            "experiment", "model", "mode", "seeds", "config", "results")})
        assert set(entries.pop("headline_methods").values()) == ran[exp]
        assert set(entries) == {headline_name(m) for m in ran[exp]}, exp
        assert all(v is not None for v in entries.values())
        json.dumps(entries, allow_nan=False)  # strict JSON: no NaN/Infinity tokens
    assert {"SST-Merge", "TA", "TIES", "DARE-TIES", "AGL", "Fisher"} <= set(
        headline_entries("exp3", payloads["exp3"]))
    assert "SST-Multi" in headline_entries("exp2", payloads["exp2"])


def test_headline_numbers_are_the_seed_results(tiny_run):
    from experiments.headlines import headline_entries
    from sst_jax.eval.report import json_safe

    payloads = tiny_run[2]
    exp3 = payloads["exp3"]["results"]["0"]
    sst = headline_entries("exp3", payloads["exp3"])["SST-Merge"]
    assert sst["hypervolume"] == pytest.approx(exp3["summary"]["sst"]["hypervolume"])
    assert sst["hypervolume_2d"] == pytest.approx(exp3["summary"]["sst"]["hypervolume_2d"])
    assert sst["best"]["alpha"] == exp3["summary"]["sst"]["best_alpha"]
    assert sst["pareto_alphas"] == exp3["summary"]["sst"]["pareto_alphas"]
    exp1 = payloads["exp1"]["results"]["0"]["safety_tax"]["sst@1"]
    tax = headline_entries("exp1", payloads["exp1"])["SST-Merge"]["safety_tax"]
    assert (tax["absolute"], tax["absolute_ci"]) == (json_safe(exp1["absolute"]), json_safe(exp1["absolute_ci"]))
    exp2 = payloads["exp2"]["results"]["0"]["results"]["2"]["methods"]["sst"]
    assert headline_entries("exp2", payloads["exp2"])["SST-Merge"]["retention_mean"]["2"] == \
        exp2["retention_mean"]


def test_a_method_absent_from_the_run_has_no_entry(tiny_run):
    from experiments.headlines import headline_entries

    payload = json.loads(json.dumps(tiny_run[2]["exp3"]))
    for res in payload["results"].values():
        res["rows"] = [r for r in res["rows"] if r["method"] != "sst"]
        res["summary"].pop("sst")
    entries = headline_entries("exp3", payload)
    assert "SST-Merge" not in entries and "TA" in entries
