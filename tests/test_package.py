"""`pip install .` gives a package that imports from any directory, with its commands."""
import os
import pkgutil
import shutil
import subprocess
import sys

from conftest import REPO


def test_the_installed_package_imports_every_module_from_elsewhere_and_has_its_commands(tmp_path):
  source, site = tmp_path / "source", tmp_path / "site"
  # A copy, so that the build writes nothing into the checkout.
  shutil.copytree(REPO / "cfdg_jax", source / "cfdg_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "requirements.txt"):
    shutil.copy(REPO / name, source)
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--no-build-isolation", "--target", str(site), str(source)], check=True)

  modules = sorted(m.name for m in pkgutil.walk_packages([str(REPO / "cfdg_jax")], "cfdg_jax."))
  assert "cfdg_jax.samplers.ancestral" in modules and "cfdg_jax.eval.fid" in modules
  # The commands' modules define absl flags (some of the same name): one a process, below.
  path = lambda m: REPO / (m.replace(".", "/") + ".py")  # None for a package's __init__.
  commands = [m for m in modules if path(m).exists() and "\ndef cli() -> None:" in
              path(m).read_text()]
  modules = [m for m in modules if m not in commands]
  script = ("import importlib, pathlib, cfdg_jax\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(cfdg_jax.__file__)\n"  # The H100 description, package data:
            "print(len(list(pathlib.Path(cfdg_jax.__file__).with_name('gpu_targets').glob('*.txtpb'))))")
  env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == [str(site / "cfdg_jax" / "__init__.py"), "1"]

  scripts = {p.name: p.read_text() for p in (site / "bin").iterdir()}
  assert {next(m for m in commands if f"from {m} import cli" in text)
          for text in scripts.values()} == set(commands) and len(scripts) == len(commands)
  usage = subprocess.run([sys.executable, str(site / "bin" / "cfdg-sample"), "--helpshort"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
  # Its doc and its flags, as `python -m cfdg_jax.sample --helpshort` shows them.
  assert usage.stdout.startswith("Samples from a trained model's EMA weights"), usage.stdout
  assert "\ncfdg_jax.sample:\n  --batch_size" in usage.stdout, usage.stdout
