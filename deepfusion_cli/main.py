"""The `deepfusion` command line: the top of the house, it may import every layer.

Every command turns a user error (bad path, unfusable models, mismatched checkpoint, ...)
into one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Grow T5 models by deep fusion: train, fuse, convert, benchmark.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect models and presets.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (one line of figures + JSON).")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")

USAGE_ERROR = 2


def fail(message: str) -> None:
    """Print one line to stderr and exit with the usage-error status."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


def user_errors(fn):
    """Report the library's input errors (all ValueError/OSError subclasses) as one line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return wrapper


def _resolve_config(preset_or_ckpt: str):
    from deepfusion_core import PRESETS
    from deepfusion_core.checkpoint import read_config

    if preset_or_ckpt in PRESETS:
        return PRESETS[preset_or_ckpt]
    if not Path(preset_or_ckpt).exists():
        fail(f"{preset_or_ckpt!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
             f"checkpoint path")
    return read_config(preset_or_ckpt)


@model_app.command("info")
@user_errors
def model_info(preset_or_ckpt: str,
               as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False):
    """Dimensions, parameter count and norm groups of a preset or a checkpoint."""
    from deepfusion_core import count_params

    cfg = _resolve_config(preset_or_ckpt)
    n = count_params(cfg)
    info = {"model": preset_or_ckpt, **cfg.model_dump(mode="json"), "params": n,
            "param_bytes_float32": 4 * n}
    if as_json:
        typer.echo(json.dumps(info))
        return
    typer.echo(f"{preset_or_ckpt}: {cfg.describe()}")
    typer.echo(f"  parameters: {n:,} ({4 * n / 2**20:,.1f} MiB in float32)")
    typer.echo(f"  norm groups: {list(cfg.norm_groups)}   compute dtype: {cfg.dtype}")


def _parse_weights(text: Optional[str], n: int) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        fail(f"--weights must be comma-separated numbers, got {text!r}")
    if len(weights) != n:
        fail(f"--weights has {len(weights)} values for {n} models")
    return weights


@app.command()
@user_errors
def fuse(checkpoints: Annotated[list[Path], typer.Argument(help="Two or more model checkpoints "
                                                          "(the same one twice: self fusion).")],
         out: Annotated[Path, typer.Option(help="Where to write the fused checkpoint.")],
         norm: Annotated[Optional[str], typer.Option(
             help="prop (grouped RMSNorm, exact ensemble) or rule (one RMSNorm). "
                  "Default: rule for self fusion, prop otherwise.")] = None,
         cross_std: Annotated[float, typer.Option(help="Std of the off-diagonal blocks.")] = 0.0,
         seed: Annotated[int, typer.Option(help="Seed of the off-diagonal noise.")] = 0,
         weights: Annotated[Optional[str], typer.Option(
             help="Comma-separated logit averaging weights (default 1/n each).")] = None):
    """Fuse model checkpoints into one wider model (deep fusion)."""
    from deepfusion_core import fuse as fuse_models
    from deepfusion_core import load_model, save_model
    from deepfusion_core.checkpoint import read_config
    from deepfusion_core.fusion import check_fusable

    if out.exists():
        fail(f"--out {out} already exists; choose a new path")
    if norm not in (None, "prop", "rule"):
        fail(f"--norm must be prop or rule, got {norm!r}")
    parsed_weights = _parse_weights(weights, len(checkpoints))
    check_fusable([read_config(c) for c in checkpoints])  # before reading any array
    start = time.perf_counter()
    loaded: dict[Path, tuple] = {}
    for c in checkpoints:  # the same path twice is loaded once (self fusion)
        loaded.setdefault(c.resolve(), load_model(c))
    models = [loaded[c.resolve()] for c in checkpoints]
    cfg, params = fuse_models(models, norm=norm, cross_std=cross_std, seed=seed,
                              weights=parsed_weights)
    save_model(out, cfg, params)
    typer.echo(f"fused {len(models)} models into {out} ({cfg.describe()}) "
               f"in {time.perf_counter() - start:.1f}s")


@app.command("import-hf")
@user_errors
def import_hf(hf_dir: Path, out: Path):
    """Convert a transformers T5ForConditionalGeneration (T5.1.1) directory to a checkpoint."""
    from deepfusion_core.hf import import_hf as convert

    path = convert(hf_dir, out)
    typer.echo(f"imported {hf_dir} into {path}")


@app.command("export-hf")
@user_errors
def export_hf(ckpt: Path, out_dir: Path):
    """Write a checkpoint as a transformers T5ForConditionalGeneration directory."""
    from deepfusion_core.hf import export_hf as convert

    path = convert(ckpt, out_dir)
    typer.echo(f"exported {ckpt} to {path}")


def _emit(record: dict, line: str) -> None:
    typer.echo(line)
    typer.echo(json.dumps(record))


@bench_app.command("fuse")
def bench_fuse(preset: str = "table7-M", cross_std: float = 0.0):
    """Fuse two random PRESET models; compare wall time and peak RSS with the copy bound."""
    from deepfusion_core.benchmarks import bench_fuse as run

    r = run(preset, cross_std)
    _emit(r, f"fuse {r['inputs']} -> {r['output_gb']} GB: wall {r['wall_s']}s = "
             f"{r['wall_over_copy']}x copy ({r['copy_s']}s); peak RSS {r['peak_rss_gb']} GB = "
             f"{r['peak_over_in_plus_out']}x (inputs + output)")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="deepfusion")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
