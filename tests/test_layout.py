"""Tests of the repo's shape: the import flow between the top-level files, the size limits
(files, functions, train.main and its loop: they cannot grow back unseen), which files start
processes, the README's commands, and that --help shows the values the command typed will run.

    python tests/test_layout.py      # the size table: each file's lines and longest function
"""
import ast
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(name):
    """The top-level files that `name`.py imports (anywhere in it, lazy imports included)."""
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_import_cycle_and_the_design_flow():
    """No file imports, directly or through others, a file that imports it back; field.py
    needs only torch; toy.py needs field, models, the checkpoint format and the plotting
    helper (sample.py), not train.py; data.py does not import cache.py (cache.py sits above
    it); the low files (models, encoder, vae, checkpoint) import none of ours."""
    graph = {f: imports(f) & set(FILES) for f in FILES}

    def reach(f, seen):
        for g in graph[f]:
            if g not in seen:
                seen.add(g)
                reach(g, seen)
        return seen

    for f in FILES:
        assert f not in reach(f, set()), f"import cycle through {f}.py"
    assert imports("field") <= {"math", "torch"}
    assert graph["toy"] <= {"field", "models", "sample", "checkpoint"}
    assert "cache" not in reach("data", set())
    for low in ("models", "encoder", "vae", "checkpoint"):
        assert graph[low] == set(), (low, graph[low])
    assert graph["convnext"] <= {"encoder"}


def test_help_of_the_users_command_shows_its_recipe(capsys):
    """`python train.py --model L2 --help` prints L2's recipe (lr 4e-4, N_pos 64, EMA 0.999),
    not another stage's defaults; `--stage mae --help` prints the MAE recipe of its
    --mae-model (the paper's for the paper's MAEs, the CPU one for mnist)."""
    import config

    def help_default(argv, flag):
        with pytest.raises(SystemExit):
            config.parse_args([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())           # argparse wraps lines
        start = text.index(f" {flag} {flag[2:].upper().replace('-', '_')} ")
        return text[start:].split("(default: ", 1)[1].split(")", 1)[0]

    assert help_default(["--model", "L2"], "--lr") == "0.0004"
    assert help_default(["--model", "L2"], "--n-pos") == "64"
    assert help_default(["--model", "L2"], "--ema") == "0.999"
    assert help_default(["--model=S4"], "--lr") == "0.002"
    assert help_default(["--stage", "mae", "--mae-model", "latent_640"], "--lr") == "0.004"
    assert help_default(["--stage", "mae", "--mae-model", "latent_640"], "--ema") == "0.9995"
    assert help_default(["--stage", "mae"], "--batch") == "64"


# ------------------------------------------------------------------------------------------
# Sizes (STYLE.md): files, functions, train.main and its loop
# ------------------------------------------------------------------------------------------
FILE_LIMIT, LIMITS = 450, {"field": 220, "bench": 550}
FUNCTION_LIMIT, LONG = 80, {("train", "main"): 150, ("field", "drift_loss"): 150}


def sizes():
    """{file: (lines, [(function lines, qualified name)] longest first)} for the top-level
    files, and the lines of train.main's training loop (its first `for`)."""
    out, loop = {}, None
    for name in FILES:
        with open(os.path.join(ROOT, name + ".py")) as f:
            text = f.read()
        tree, funcs = ast.parse(text), []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, node.name))
                if name == "train" and node.name == "main":
                    first = next(n for n in ast.walk(node) if isinstance(n, ast.For))
                    loop = first.end_lineno - first.lineno + 1
        out[name] = (len(text.splitlines()), sorted(funcs, reverse=True))
    return out, loop


def test_files_functions_and_the_loop_stay_within_their_limits():
    """Every top-level .py file <= 450 lines (field.py 220, bench.py 550); no function over
    80 lines but train.main (<= 150) and field.drift_loss (the official loss, written whole);
    train.main's loop <= 60 lines."""
    table, loop = sizes()
    for name, (lines, funcs) in table.items():
        assert lines <= LIMITS.get(name, FILE_LIMIT), f"{name}.py has {lines} lines"
        for n, func in funcs:
            assert n <= LONG.get((name, func), FUNCTION_LIMIT), f"{name}.{func}: {n} lines"
    assert loop <= 60, f"train.main's loop has {loop} lines"


# ------------------------------------------------------------------------------------------
# Who starts processes: ablate.py (training runs) and bench.py (its subprocess benches and
# the torchrun smoke step), no other file
# ------------------------------------------------------------------------------------------
SPAWNERS = {"ablate", "bench"}
OS_SPAWN = re.compile(r"^(system|popen|exec\w*|spawn\w*|posix_spawn\w*|fork\w*)$")


def starts_processes(name):
    """The ways `name`.py starts a process: imports of subprocess or multiprocessing (also
    torch.multiprocessing), and os.system / popen / exec* / spawn* / fork calls."""
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[-1] in (
                "subprocess", "multiprocessing")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[-1] in ("subprocess", "multiprocessing") or any(
                    a.name in ("subprocess", "multiprocessing") for a in node.names):
                found.add(node.module)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "os" and OS_SPAWN.match(node.attr)):
            found.add(f"os.{node.attr}")
    return found


def test_only_ablate_and_bench_start_processes():
    """No file but ablate.py and bench.py starts a process (a training run or any other):
    train.py, fid.py, toy.py... run in the process that called them. The check itself
    sees subprocess in ablate.py, so it would see it anywhere."""
    assert "subprocess" in starts_processes("ablate")
    for name in set(FILES) - SPAWNERS:
        assert not starts_processes(name), (name, starts_processes(name))


# ------------------------------------------------------------------------------------------
# The README: short, and every command in it runs as written
# ------------------------------------------------------------------------------------------
def readme_commands():
    """The python / torchrun command lines of the README's ```bash blocks (continuations
    joined, comments dropped) -> [argv as `python FILE.py ...`]; torchrun's own options go."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), re.M | re.S)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv or argv[0] not in ("python", "torchrun") or argv[1:2] == ["-m"]:
            continue
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        commands.append(["python", *argv[script:]])
    return commands


DRIVER = """
import contextlib, io, json, runpy, sys
out = []
for argv in json.loads(sys.stdin.read()):
    sys.argv, text = argv, io.StringIO()
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:          # a broken import or a crash: named in the failure
        code = repr(e)
    out.append([code, text.getvalue()])
print(json.dumps(out))
"""


def test_readme_is_short_and_its_commands_run():
    """README.md <= 300 lines. Each command in its ```bash blocks runs with --help added
    (before a `--`: after it the flags belong to the trained runs): it exits 0 with a usage,
    and every --flag it types is one that help lists (argparse stops at --help before it
    would reject an unknown flag, so the help text is searched). One process runs all."""
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 300
    commands = readme_commands()
    assert len(commands) >= 10 and any("train.py" in c for c in commands)
    helped = [[*c[1:c.index("--")], "--help"] if "--" in c else [*c[1:], "--help"]
              for c in commands]
    res = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(helped), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for argv, (code, text) in zip(commands, json.loads(res.stdout.splitlines()[-1])):
        assert code == 0 and "usage:" in text, (argv, code, text[-500:])
        typed = [a.split("=")[0] for a in argv[:argv.index("--") if "--" in argv else None]
                 if a.startswith("--")]
        assert all(re.search(rf"(^|[\s,\[]){re.escape(f)}\b", text) for f in typed), (argv, text)


if __name__ == "__main__":
    table, loop = sizes()
    print("| file | lines | longest functions |\n|---|---|---|")
    for name, (lines, funcs) in table.items():
        print(f"| {name}.py | {lines} | " + ", ".join(f"{f} {n}" for n, f in funcs[:2]) + " |")
    print(f"\ntrain.main's loop: {loop} lines")
