"""``janus-decode``: the command line over the Python API (parsing, progress bars, files; no decoding logic)."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from . import output


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends in one line naming the culprit and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise click.ClickException(message) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="janus-decoding")
def main() -> None:
    """Decoding strategies for Janus / Janus-Pro, composed by name."""


# -- shared options ------------------------------------------------------------------------------------------
def _model_options(fn):
    fn = click.option("--model", default="tiny", show_default=True,
                      help="A local model folder, or 'tiny' (random weights: draws noise).")(fn)
    fn = click.option("--device", default="cpu", show_default=True)(fn)
    fn = click.option("--dtype", default="float32", show_default=True,
                      type=click.Choice(["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]))(fn)
    return fn


def _decoder_options(fn):
    fn = click.option("--decoder", "decoder_spec", default=None, help="A decoder spec, e.g. 'top_k(top_k=50)'.")(fn)
    fn = click.option("--decoder-file", type=click.Path(dir_okay=False), default=None,
                      help="A TOML decoder file ([[strategy]] tables, optional [cfg]).")(fn)
    fn = click.option("--temperature", type=float, default=None, help="Appends temperature(temperature=T).")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True)(fn)
    fn = click.option("--greedy", is_flag=True, help="Argmax of the final logits.")(fn)
    fn = click.option("--rng", type=click.Choice(["row", "torch"]), default="row", show_default=True)(fn)
    fn = click.option("--explain", is_flag=True, help="Print the decoder and what its strategies traced.")(fn)
    return fn


def _build_decoder(decoder_spec: str | None, decoder_file: str | None, temperature: float | None):
    from .plugins.decoder import Decoder
    from .plugins.strategy import StrategyError
    from .strategies.sampling import Temperature

    if decoder_spec is not None and decoder_file is not None:
        raise click.UsageError("give either --decoder or --decoder-file, not both")
    decoder = Decoder.from_toml(decoder_file) if decoder_file else Decoder.from_spec(decoder_spec or "")
    if temperature is not None:
        if any(s.name == Temperature.name for s in decoder.strategies):
            raise StrategyError("both --temperature and a temperature(...) stage were given; keep one")
        decoder = decoder.with_strategy(Temperature(temperature=temperature))
    return decoder


def _load(model: str, device: str, dtype: str):
    from . import load_model

    return load_model(model, device=device, dtype=dtype)


class _Progress:
    def __init__(self, total: int, unit: str, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit=unit, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _explain(decoder, trace: list[dict[str, Any]]) -> None:
    click.echo(f"decoder: {decoder.to_spec() or '(empty: the plain loop)'}")
    click.echo(f"cfg: weight={decoder.cfg.weight} schedule={decoder.cfg.schedule} layout={decoder.cfg.layout}")
    for item in decoder.describe():
        click.echo(f"  {item['name']}: {json.dumps(item['config'], ensure_ascii=False)} at {', '.join(item['hooks'])}")
    for event in trace:
        click.echo("  trace " + json.dumps(event, ensure_ascii=False, default=str))


# -- commands ------------------------------------------------------------------------------------------------
@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: distribution, hooks, modes, JSON Schema.")
@_fail_cleanly
def strategies(name: str | None, as_json: bool) -> None:
    """List the registered strategies (built-ins and plugins)."""
    from .plugins.registry import default_registry

    registry = default_registry()
    names = [registry.get(name).name] if name else registry.names()
    items = [registry.describe(n) for n in names]
    if as_json:
        click.echo(json.dumps(items if not name else items[0], indent=2))
    else:
        for item in items:
            flags = ("graph-safe" if item["graph_safe"] else "eager") + (", couples rows" if item["couples_rows"] else "")
            click.echo(f"{item['name']:<22} {item['summary']}")
            click.echo(f"{'':<22} hooks: {', '.join(item['hooks'])}; modes: {', '.join(item['modes'])}; {flags}; "
                       f"from {item['distribution']} {item['version']}")
            if name:
                for pname, schema in item["parameters"]["properties"].items():
                    click.echo(f"{'':<24}{pname}: {json.dumps(schema)}")
    for failure in registry.failures:
        click.echo(f"warning: plugin {failure.plugin} ({failure.distribution}) skipped: {failure.error}", err=True)


@main.command("make-tiny")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["hf", "deepseek"]), default="hf", show_default=True)
@click.option("--shape", type=click.Choice(["tiny", "1b", "7b"]), default="tiny", show_default=True,
              help="1b/7b: random weights at Janus-Pro's real shapes (large).")
@_fail_cleanly
def make_tiny(folder: str, seed: int, fmt: str, shape: str) -> None:
    """Write a random checkpoint (transformers or DeepSeek format) with its tokenizer and processor files."""
    from .models.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(folder, seed=seed, format=fmt, shape=shape)
    click.echo(f"wrote a random {shape} checkpoint ({fmt} format) to {path}")


def _compile_option(fn):
    return click.option("--compile", "compile_step", is_flag=True,
                        help="Compile the fast step's layer pieces with Inductor: ~8 s once per shape, then "
                             "9–13% faster image steps on an H200; tokens equal up to bf16 rounding.")(fn)


def _fast(compile_step: bool):
    """``fast=`` for the API: the default choice, or the fast path with compiled layer pieces."""
    if not compile_step:
        return None
    from .core.graph import FastOptions

    return FastOptions(compile="inductor")


@main.command()
@click.argument("prompts", nargs=-1, required=True)
@_model_options
@_decoder_options
@click.option("-n", "n", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--micro-batch", type=int, default=None, help="Images per forward batch (bounds memory).")
@click.option("--cfg", type=float, default=None, help="Guidance weight (default 5).")
@click.option("--negative-prompt", default=None)
@click.option("--out", "out_dir", default="out", show_default=True, type=click.Path(file_okay=False))
@click.option("--save-intermediates", is_flag=True, help="Also write images strategies emit (e.g. TwiG stages).")
@_compile_option
@_fail_cleanly
def generate(prompts, model, device, dtype, decoder_spec, decoder_file, temperature, seed, greedy, rng, explain, n,
             micro_batch, cfg, negative_prompt, out_dir, save_intermediates, compile_step) -> None:
    """Generate images: N PNGs per prompt, a contact sheet per prompt and manifest.jsonl."""
    if n < 1:
        raise click.BadParameter(f"must be ≥ 1, got {n}", param_hint="-n")
    if micro_batch is not None and micro_batch < 1:
        raise click.BadParameter(f"must be ≥ 1, got {micro_batch}", param_hint="--micro-batch")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise click.BadParameter(f"prompt {i + 1} is empty", param_hint="PROMPTS")
    decoder = _build_decoder(decoder_spec, decoder_file, temperature)
    decoder.with_cfg(weight=cfg, negative_prompt=negative_prompt)  # check --cfg/--negative-prompt before any work
    output.check_writable_dir(out_dir)
    handle = _load(model, device, dtype)
    out = output.ensure_writable_dir(out_dir)  # created only once the model has loaded
    rows, cols = handle.image_grid or (0, 0)
    progress = _Progress(len(prompts) * n * rows * cols, "tok", "generating")
    try:
        result = decoder.generate_images(handle, list(prompts), n=n, cfg=cfg, seed=seed, micro_batch=micro_batch,
                                         greedy=greedy, rng=rng, negative_prompt=negative_prompt, progress=progress,
                                         fast=_fast(compile_step))
    finally:
        progress.close()
    manifest = out / "manifest.jsonl"
    for i, prompt in enumerate(result.prompts):
        stem = f"{i:05d}_{output.slug(prompt)}"
        files = []
        for k, picture in enumerate(result.images[i]):
            path = out / f"{stem}_{k}.png"
            output.write_png(picture, path)
            files.append(path.name)
        output.write_png(output.contact_sheet(result.images[i]), out / f"{stem}_sheet.png")
        if save_intermediates:
            for item in (x for x in result.intermediates if x["prompt"] == i):
                name = f"{stem}_{item['image']}_{output.slug(item['strategy'])}_{output.slug(item['label'])}.png"
                output.write_png(item["picture"], out / name)
                files.append(name)
        output.append_manifest(manifest, {
            "prompt": prompt, "seed": result.seeds[i], "n": n, "decoder": decoder.to_spec(), "model": model,
            "cfg": cfg if cfg is not None else decoder.cfg.weight, "rng": rng, "greedy": greedy, "files": files,
            "token_hashes": [output.token_hash(t.tolist()) for t in result.tokens[i]],
            "trace": [e for e in result.trace], "seconds": round(result.seconds, 3),
        })
    if explain:
        _explain(decoder, result.trace)
    click.echo(f"wrote {len(result.prompts) * n} images for {len(result.prompts)} prompt(s) to {out} "
               f"in {result.seconds:.1f}s")


@main.command()
@click.argument("prompts_file", metavar="PROMPTS", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The job's folder.")
@_model_options
@click.option("--decoder", "decoder_spec", default=None, help="A decoder spec, e.g. 'top_k(top_k=50)'.")
@click.option("--decoder-file", type=click.Path(dir_okay=False), default=None, help="A TOML decoder file.")
@click.option("-n", "n", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Images per forward batch; prompts are packed together while their images fit.")
@click.option("--cfg", type=float, default=None, help="Guidance weight (default 5).")
@click.option("--negative-prompt", default=None)
@click.option("--temperature", type=float, default=None, help="Appends temperature(temperature=T).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Base seed: prompt i gets BASE + i unless it names its own.")
@click.option("--greedy", is_flag=True, help="Argmax of the final logits.")
@click.option("--rng", type=click.Choice(["row", "torch"]), default="row", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the job in --out (its settings must match).")
@click.option("--deterministic", is_flag=True,
              help="torch.use_deterministic_algorithms (warn-only), a fixed cuBLAS workspace and no cuDNN attention: "
                   "runs repeat exactly, in any number of processes.")
@_compile_option
@_fail_cleanly
def batch(prompts_file, out_dir, model, device, dtype, decoder_spec, decoder_file, n, micro_batch, cfg,
          negative_prompt, temperature, seed, greedy, rng, resume, deterministic, compile_step) -> None:
    """Generate images for every prompt of a JSON / JSONL file; resumable, several processes under accelerate."""
    from . import batch as job

    if deterministic:
        import os

        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    if negative_prompt is not None and not negative_prompt.strip():
        raise click.BadParameter("is empty", param_hint="--negative-prompt")
    items, digest = job.read_prompts(prompts_file, n=n, base_seed=seed)
    decoder = _build_decoder(decoder_spec, decoder_file, temperature)
    decoder.with_cfg(weight=cfg, negative_prompt=negative_prompt)  # check --cfg before any work
    built = {None: decoder}

    def decoder_for(spec: str | None):
        if spec not in built:
            built[spec] = _build_decoder(spec, None, temperature)
        return built[spec]

    settings = job.JobSettings(model=model, decoder=decoder.to_spec(), n=n, seed=seed, cfg=cfg,
                               negative_prompt=negative_prompt, temperature=temperature, rng=rng, greedy=greedy,
                               dtype=dtype, micro_batch=micro_batch, prompts_sha256=digest, compile=compile_step)
    processes = job.Processes.detect(device)

    def progress(total: int):
        from tqdm import tqdm

        return tqdm(total=total, unit="prompt", desc="batch", file=sys.stderr, dynamic_ncols=True,
                    disable=not processes.is_main)

    report = job.run_job(prompts_file=prompts_file, out_dir=out_dir, settings=settings, items=items,
                         decoder_for=decoder_for, load=lambda dev: _load(model, dev, dtype), processes=processes,
                         resume=resume, say=lambda text: click.echo(text, err=True), progress=progress,
                         generate_kwargs={"cfg": cfg, "micro_batch": micro_batch, "greedy": greedy, "rng": rng,
                                          "fast": _fast(compile_step)})
    click.echo(job.summary(report, out_dir, processes))
    if report.exit_code:
        sys.exit(report.exit_code)


def _text_command(kind: str):
    def run(args, model, device, dtype, decoder_spec, decoder_file, temperature, seed, greedy, rng, explain,
            max_new_tokens, stream) -> None:
        decoder = _build_decoder(decoder_spec, decoder_file, temperature)
        sink = (lambda piece: click.echo(piece, nl=False)) if stream else None
        if kind == "understand":
            *image_paths, question = args
            if not image_paths:
                raise click.UsageError("give at least one IMAGE before the QUESTION")
            if not question.strip():
                raise click.BadParameter("the question is empty", param_hint="QUESTION")
            images = [_open_image(p) for p in image_paths]
            handle = _load(model, device, dtype)
            result = decoder.answer(handle, images, question, max_new_tokens=max_new_tokens, seed=seed,
                                    greedy=greedy, rng=rng, stream=sink)
        else:
            prompt = " ".join(args)
            if not prompt.strip():
                raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
            handle = _load(model, device, dtype)
            result = decoder.chat(handle, prompt, max_new_tokens=max_new_tokens, seed=seed, greedy=greedy, rng=rng,
                                  stream=sink)
        if stream:
            click.echo()
        else:
            click.echo(result.texts[0])
        if explain:
            _explain(decoder, result.trace)

    return run


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise click.BadParameter(f"{path}: no such file", param_hint="IMAGE") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise click.BadParameter(f"{path}: not a readable image ({exc})", param_hint="IMAGE") from None


def _text_options(fn):
    fn = click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)(fn)
    fn = click.option("--stream", is_flag=True, help="Print the answer as it is generated.")(fn)
    return fn


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="IMAGE... QUESTION")
@_model_options
@_decoder_options
@_text_options
@_fail_cleanly
def understand(args, **kwargs) -> None:
    """Answer a question about one or more images."""
    _text_command("understand")(args, **kwargs)


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="PROMPT")
@_model_options
@_decoder_options
@_text_options
@_fail_cleanly
def chat(args, **kwargs) -> None:
    """Text in, text out (Janus or a plain causal LM folder)."""
    _text_command("chat")(args, **kwargs)


if __name__ == "__main__":
    main()
