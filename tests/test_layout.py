"""Tests of the repo's shape: the import flow between the top-level files, and that --help
shows the values the command the user typed will run."""
import ast
import os

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
    needs only torch; toy.py needs field, models and the plotting helper (sample.py), not
    train.py; data.py does not import cache.py (cache.py sits above it)."""
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
    assert graph["toy"] <= {"field", "models", "sample"}
    assert "cache" not in reach("data", set())
    for low in ("models", "encoder", "vae"):
        assert graph[low] == set(), (low, graph[low])
    assert graph["convnext"] <= {"encoder"}


def test_help_of_the_users_command_shows_its_recipe(capsys):
    """`python train.py --model L2 --help` prints L2's recipe (lr 4e-4, N_pos 64, EMA 0.999),
    not another stage's defaults; `--stage mae --help` prints the MAE recipe of its
    --mae-model (the paper's for the paper's MAEs, the CPU one for mnist)."""
    import train

    def help_default(argv, flag):
        with pytest.raises(SystemExit):
            train.parse_args([*argv, "--help"])
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
