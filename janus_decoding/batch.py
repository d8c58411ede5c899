"""The ``batch`` job: a prompt file in, many images out, surviving crashes, bad prompts and several processes.

Files in the output folder (see docs/batch.md):

- ``job.json``: every generation setting; ``--resume`` refuses a job whose settings differ.
- ``{index:05d}_{slug}_{k}.png`` and ``{index:05d}_{slug}_sheet.png``: written to a temporary file, then renamed.
- ``manifest.jsonl``: one line per finished prompt, appended (and fsynced) only after all its pictures exist. Under
  several processes each one appends to its own shard ``manifest.rank-R-of-W.jsonl``; the shards are merged into
  ``manifest.jsonl`` at the end (one line per prompt, in index order).
- ``failures.jsonl``: one line per prompt that failed (a strategy raised, NaN / +inf logits, a bad per-prompt
  decoder), with the reason; the job goes on.

This module holds no decoding logic: it calls ``Decoder.generate_images``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import output

JOB_FILE = "job.json"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
# Janus-Pro's language model has a 16,384-token context and an image needs 576 of it; every token covers at least
# one character of ordinary text, so a longer prompt cannot fit (checked here, before any model is loaded).
MAX_PROMPT_CHARS = 16_384
PROMPT_KEYS = ("prompt", "n", "seed", "decoder", "negative_prompt")
# Environment variables a distributed launcher (torchrun under `accelerate launch`, or mpirun) sets.
_LAUNCH_ENV = ("LOCAL_RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_TMP_SUFFIX = output.TMP_SUFFIX  # temporary files of interrupted writes, cleaned up on restart
_EXIT_INTERRUPTED = 130


class BatchInputError(ValueError):
    """A prompt file, job setting or output folder the batch job cannot use; the message names the culprit."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the job: its position in the file (which fixes its seed and file names) and its settings."""

    index: int
    prompt: str
    n: int
    seed: int
    decoder: str | None = None
    negative_prompt: str | None = None

    @property
    def stem(self) -> str:
        return f"{self.index:05d}_{output.slug(self.prompt)}"

    def files(self) -> list[str]:
        return [f"{self.stem}_{k}.png" for k in range(self.n)]


@dataclass(frozen=True)
class JobSettings:
    """Every setting that changes the pictures; ``job.json`` holds them and ``--resume`` compares them."""

    model: str
    decoder: str
    n: int
    seed: int
    cfg: float | None
    negative_prompt: str | None
    temperature: float | None
    rng: str
    greedy: bool
    dtype: str
    micro_batch: int | None
    prompts_sha256: str
    compile: bool = False  # the fast step's layer pieces through Inductor: the same tokens up to bf16 rounding

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the prompt file -----------------------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike[str], *, n: int, base_seed: int) -> tuple[list[PromptItem], str]:
    """Parse a JSON list (strings or objects ``{prompt, n?, seed?, decoder?, negative_prompt?}``) or JSONL.

    Returns the items and the SHA-256 of the file. Raises :class:`BatchInputError` naming the file, the item and the
    field; never another exception type.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise BatchInputError(f"prompt file {file}: no such file") from None
    except OSError as exc:
        raise BatchInputError(f"prompt file {file}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchInputError(f"prompt file {file}: not UTF-8 text (byte {exc.start})") from None
    entries = _json_entries(file, text)
    if not entries:
        raise BatchInputError(f"prompt file {file}: no prompts (an empty list)")
    items = [_item(file, where, i, entry, n, base_seed) for i, (where, entry) in enumerate(entries)]
    return items, hashlib.sha256(raw).hexdigest()


def _json_entries(file: Path, text: str) -> list[tuple[str, Any]]:
    stripped = text.strip()
    if not stripped:
        raise BatchInputError(f"prompt file {file}: empty file")
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise BatchInputError(f"prompt file {file}: invalid JSON ({_json_reason(exc)})") from None
        if not isinstance(data, list):
            raise BatchInputError(f"prompt file {file}: expected a JSON list of prompts")
        return [(f"item {i + 1}", entry) for i, entry in enumerate(data)]
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"line {number}", json.loads(line)))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise BatchInputError(f"prompt file {file}: line {number} is not valid JSON ({_json_reason(exc)}); "
                                  "give a JSON list or one JSON value per line") from None
    return entries


def _json_reason(exc: Exception) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"


def _item(file: Path, where: str, index: int, entry: Any, n: int, base_seed: int) -> PromptItem:
    def bad(message: str) -> BatchInputError:
        return BatchInputError(f"prompt file {file}, {where}: {message}")

    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict):
        raise bad(f"expected a string or an object, got {_json_type(entry)}")
    unknown = sorted(set(entry) - set(PROMPT_KEYS))
    if unknown:
        raise bad(f"unknown key `{unknown[0]}` (keys: {', '.join(PROMPT_KEYS)})")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise bad(f"`prompt` must be a string, got {_json_type(prompt)}")
    if not prompt.strip():
        raise bad("`prompt` is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad(f"`prompt` has {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} fit the model's context")
    count = entry.get("n", n)
    if not _is_int(count) or count < 1:
        raise bad(f"`n` must be an integer ≥ 1, got {count!r}")
    seed = entry.get("seed", base_seed + index)
    if not _is_int(seed) or seed < 0:
        raise bad(f"`seed` must be an integer ≥ 0, got {seed!r}")
    for key in ("decoder", "negative_prompt"):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"`{key}` must be a string, got {_json_type(value)}")
    negative = entry.get("negative_prompt")
    if negative is not None and not negative.strip():
        raise bad("`negative_prompt` is empty")
    return PromptItem(index, prompt, count, seed, entry.get("decoder"), negative)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -- processes -----------------------------------------------------------------------------------------------
@dataclass
class Processes:
    """This process's place among the job's processes (one, or several under ``accelerate launch``)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    _state: Any = None

    @classmethod
    def detect(cls, device: str | None) -> "Processes":
        """Use ``accelerate.PartialState`` when a distributed launcher started us; otherwise one process."""
        if not any(os.environ.get(name) for name in _LAUNCH_ENV):
            return cls(device=device or _default_device())
        try:
            from accelerate import PartialState
        except ImportError:
            raise BatchInputError("several processes need accelerate: pip install 'janus-decoding[multi]'") from None
        wanted = device or _default_device()
        state = PartialState(cpu=wanted.startswith("cpu"))
        # "cuda" means this process's GPU (cuda:LOCAL_RANK); an explicit index is kept as given.
        chosen = str(state.device) if wanted == "cuda" else wanted
        return cls(state.process_index, state.num_processes, chosen, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None and self.world > 1:
            self._state.wait_for_everyone()

    def manifest_shard(self, out: Path) -> Path:
        return out / (MANIFEST if self.world == 1 else f"manifest.rank-{self.rank}-of-{self.world}.jsonl")

    def failures_shard(self, out: Path) -> Path:
        return out / (FAILURES if self.world == 1 else f"failures.rank-{self.rank}-of-{self.world}.jsonl")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- files ---------------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Write a JSON file through a temporary sibling and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    output.write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The intact JSON-object lines of a file; a line torn by a crash (or anything else unreadable) is skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _is_int(record.get("index")):
            yield record


def repair_jsonl(path: Path) -> None:
    """Drop torn lines so the next append starts on a fresh line (each process repairs only its own shard)."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    records = list(read_jsonl(path))
    clean = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if clean != text:
        write_text_atomic(path, clean)


def remove_temporaries(out: Path) -> list[Path]:
    """Temporary files a killed run left behind (``.<name>.<random>.tmp``)."""
    removed = []
    for path in out.glob(f".*{_TMP_SUFFIX}"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def image_is_readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def finished(out: Path, items: Sequence[PromptItem]) -> dict[int, dict[str, Any]]:
    """Prompts whose manifest line (in any shard) matches the prompt and whose pictures all exist and decode."""
    done: dict[int, dict[str, Any]] = {}
    for shard in _shards(out, "manifest"):
        for record in read_jsonl(shard):
            i = record["index"]
            if i in done or not 0 <= i < len(items):
                continue
            item = items[i]
            if record.get("prompt") != item.prompt or record.get("files") != item.files():
                continue
            if all(image_is_readable(out / name) for name in item.files()):
                done[i] = record
    return done


def _shards(out: Path, kind: str) -> list[Path]:
    return sorted(out.glob(f"{kind}*.jsonl"))


def merge_shards(out: Path, items: Sequence[PromptItem]) -> tuple[int, int]:
    """Rewrite ``manifest.jsonl`` (one line per finished prompt, index order) and ``failures.jsonl`` (prompts still
    not done) from every shard, then remove the per-process shards. Returns (finished, failed)."""
    done = finished(out, items)
    write_text_atomic(out / MANIFEST, "".join(json.dumps(done[i], ensure_ascii=False) + "\n" for i in sorted(done)))
    failed: dict[int, dict[str, Any]] = {}
    for shard in _shards(out, "failures"):
        for record in read_jsonl(shard):
            if record["index"] not in done:
                failed[record["index"]] = record
    if failed:
        write_text_atomic(out / FAILURES, "".join(json.dumps(failed[i], ensure_ascii=False) + "\n"
                                                  for i in sorted(failed)))
    else:
        (out / FAILURES).unlink(missing_ok=True)
    for shard in [*_shards(out, "manifest"), *_shards(out, "failures")]:
        if shard.name not in (MANIFEST, FAILURES):
            shard.unlink(missing_ok=True)
    return len(done), len(failed)


# -- the job -------------------------------------------------------------------------------------------------
def check_folder(out_dir: str, settings: JobSettings, *, resume: bool, processes: Processes) -> Path:
    """Check the folder and any ``job.json`` in it (every process) before anything is loaded or written."""
    out = Path(out_dir)
    job = out / JOB_FILE
    if processes.is_main:
        out = output.ensure_writable_dir(out)
    processes.barrier()
    if job.exists():
        if not resume:
            raise BatchInputError(f"{out} already holds a batch job ({JOB_FILE}); pass --resume to continue it or "
                                  "choose another --out")
        try:
            recorded = json.loads(job.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BatchInputError(f"{job}: unreadable ({exc})") from None
        wanted = settings.to_json()
        # a setting added after the job was written counts as its default
        defaults = {f.name: f.default for f in dataclasses.fields(JobSettings) if f.default is not dataclasses.MISSING}
        differ = [k for k in wanted if recorded.get(k, defaults.get(k)) != wanted[k]] if isinstance(recorded, dict) \
            else ["all"]
        if differ:
            what = "; ".join(f"{k}: job has {recorded.get(k)!r}, this run {wanted[k]!r}" for k in differ[:4]) \
                if isinstance(recorded, dict) else "not a JSON object"
            raise BatchInputError(f"--resume: the job in {out} has other settings ({what}); "
                                  "use the same settings or another --out")
    return out


def start_folder(out: Path, settings: JobSettings, processes: Processes) -> None:
    """The main process writes ``job.json`` (if new) and removes temporary files a killed run left behind; each
    process drops torn lines from its own shards."""
    processes.barrier()
    if processes.is_main:
        remove_temporaries(out)
        if not (out / JOB_FILE).exists():
            write_json_atomic(out / JOB_FILE, settings.to_json())
    repair_jsonl(processes.manifest_shard(out))
    repair_jsonl(processes.failures_shard(out))
    processes.barrier()  # every process has read the shards and is set up before anyone appends


def groups(items: Sequence[PromptItem], *, micro_batch: int | None, pack: bool) -> Iterator[list[PromptItem]]:
    """Consecutive prompts sharing decoder, negative prompt and ``n``, packed while their images fit one
    ``micro_batch`` (one prompt per call without it, or when packing is off: the torch RNG's stream depends on the
    batch; a decoder that couples rows is split again in :func:`_run_group`)."""
    group: list[PromptItem] = []
    for item in items:
        key = (item.decoder, item.negative_prompt, item.n)
        per_call = max(1, (micro_batch or item.n) // item.n)
        if group and (not pack or len(group) >= per_call
                      or (group[0].decoder, group[0].negative_prompt, group[0].n) != key):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


@dataclass
class JobReport:
    finished: int = 0
    skipped: int = 0
    failed: int = 0
    images: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return _EXIT_INTERRUPTED if self.interrupted else (1 if self.failed else 0)


class _StopAfterCurrent:
    """First Ctrl-C: finish the prompts in flight, then stop with a clean manifest; a second one stops at once."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested, self.say, self.previous = False, say, None

    def __enter__(self) -> "_StopAfterCurrent":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("interrupted: stopping after the current prompt (Ctrl-C again to stop now)")

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_job(*, prompts_file: str, out_dir: str, settings: JobSettings, items: Sequence[PromptItem],
            decoder_for: Callable[[str | None], Any], load: Callable[[str], Any], processes: Processes,
            resume: bool, generate_kwargs: dict[str, Any], say: Callable[[str], None] = print,
            progress: Callable[[int], Any] | None = None) -> JobReport:
    """Run (or resume) a job: this process's share of the prompts not yet finished, then merge the shards.

    ``decoder_for(spec)`` builds the decoder of a prompt (``None``: the job's); ``load(device)`` loads the model;
    ``generate_kwargs`` go to ``Decoder.generate_images`` unchanged (cfg, micro_batch, greedy, rng).
    """
    out = check_folder(out_dir, settings, resume=resume, processes=processes)
    done = finished(out, items)
    pending = [item for item in items if item.index not in done][processes.rank::processes.world]
    model = load(processes.device) if pending else None  # a bad model fails before anything is written
    start_folder(out, settings, processes)
    report = JobReport(skipped=len(done))
    start = time.perf_counter()
    if pending:
        pack = generate_kwargs.get("rng", "row") == "row"
        bar = progress(len(pending)) if progress is not None else None
        with _StopAfterCurrent(say) as stop:
            for group in groups(pending, micro_batch=generate_kwargs.get("micro_batch"), pack=pack):
                _run_group(out, group, settings, decoder_for, model, processes, generate_kwargs, report)
                if bar is not None:
                    bar.update(len(group))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"{report.images / max(elapsed, 1e-9):.2f} img/s, {report.failed} failed")
                if stop.requested:
                    report.interrupted = True
                    break
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - start
    processes.barrier()
    if processes.is_main:
        merge_shards(out, items)
    processes.barrier()
    return report


def _run_group(out: Path, group: list[PromptItem], settings: JobSettings, decoder_for: Callable[[str | None], Any],
               model: Any, processes: Processes, kwargs: dict[str, Any], report: JobReport) -> None:
    first = group[0]
    try:
        decoder = decoder_for(first.decoder)
        if len(group) > 1 and decoder.couples_rows:
            for item in group:
                _run_group(out, [item], settings, decoder_for, model, processes, kwargs, report)
            return
        result = decoder.generate_images(model, [item.prompt for item in group], n=first.n,
                                         seed=[item.seed for item in group],
                                         negative_prompt=first.negative_prompt or settings.negative_prompt, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a failing prompt is recorded and the job goes on
        if len(group) > 1:  # find which prompt failed: redo them one by one
            for item in group:
                _run_group(out, [item], settings, decoder_for, model, processes, kwargs, report)
            return
        _record_failure(processes.failures_shard(out), first, exc)
        report.failed += 1
        return
    share = result.seconds / len(group)
    for i, item in enumerate(group):
        began = time.perf_counter()
        for name, picture in zip(item.files(), result.images[i]):
            output.write_png(picture, out / name)
        output.write_png(output.contact_sheet(result.images[i]), out / f"{item.stem}_sheet.png")
        output.append_manifest(processes.manifest_shard(out), {
            "index": item.index, "prompt": item.prompt, "seed": item.seed, "n": item.n,
            "decoder": decoder.to_spec(), "negative_prompt": item.negative_prompt or settings.negative_prompt,
            "model": settings.model, "cfg": kwargs.get("cfg") if kwargs.get("cfg") is not None else decoder.cfg.weight,
            "rng": kwargs.get("rng", "row"), "greedy": bool(kwargs.get("greedy")), "files": item.files(),
            "sheet": f"{item.stem}_sheet.png",
            "token_hashes": [output.token_hash(t.tolist()) for t in result.tokens[i]],
            "seconds": {"generate": round(share, 4), "write": round(time.perf_counter() - began, 4)},
            "rank": processes.rank,
        })
        report.finished += 1
        report.images += item.n


def _record_failure(path: Path, item: PromptItem, exc: Exception) -> None:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    output.append_manifest(path, {"index": item.index, "prompt": item.prompt, "seed": item.seed,
                                  "decoder": item.decoder, "error": type(exc).__name__, "reason": reason})


def summary(report: JobReport, out: str, processes: Processes) -> str:
    who = f"process {processes.rank}/{processes.world}: " if processes.world > 1 else ""
    rate = report.images / report.seconds if report.seconds > 0 else 0.0
    state = "interrupted; " if report.interrupted else ""
    return (f"{who}{state}{report.finished} prompt(s) done, {report.skipped} already done, {report.failed} failed; "
            f"{report.images} images in {report.seconds:.1f}s ({rate:.2f} img/s) in {out}")


__all__ = ["BatchInputError", "PromptItem", "JobSettings", "JobReport", "Processes", "read_prompts", "run_job",
           "finished", "merge_shards", "summary", "MAX_PROMPT_CHARS"]
