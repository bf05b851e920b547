"""The `transformers-vhead` command: `demo`, `inspect`, `convert`, `export` and `score`.

It lives beside the `transformers_vhead` package, not in it: importing the package registers its classes with
transformers, which imports torch and transformers (seconds), so the command parses its arguments first and imports the
package only to run one; `--help` and usage errors answer at once. Each subcommand is one function that takes the
parsed arguments and returns the exit code. An error the user can act on is printed as one line,
`transformers-vhead: error: <message>`, with exit code 1 (argparse's usage errors keep 2); `--debug` re-raises it with
its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROG = "transformers-vhead"

# Errors printed as one line (every error of transformers_vhead.errors is one of these too). Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError, ImportError)

# transformers_vhead.EXPORT_FORMATS, written out so that `--help` imports nothing heavy (a test keeps them equal).
EXPORT_FORMATS = ("causal-lm", "seq2seq-lm", "seq-cls", "trl")


# --- loading -------------------------------------------------------------------------------------------------------


def _hub_kwargs(cache_dir: str | None) -> dict:
    return {"cache_dir": cache_dir} if cache_dir else {}


def _is_seq2seq(source: str, hub_kwargs: dict) -> bool:
    """Whether `source` holds an encoder-decoder model: its config.json says so, or, for a PEFT adapter without one,
    its base model's. `False` when no config is found: `from_pretrained` then says what is wrong with `source`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError, KeyError):
        try:
            from peft import PeftConfig

            base = PeftConfig.from_pretrained(source, **hub_kwargs).base_model_name_or_path
            config = AutoConfig.from_pretrained(base, **hub_kwargs)
        except (OSError, ValueError, KeyError, TypeError, ImportError):  # ImportError: no peft, so no adapter to read
            return False
    return bool(getattr(config, "is_encoder_decoder", False))


def load_model(source: str, cache_dir: str | None = None):
    """The value-head model at `source`, on CPU: a directory saved by this package, a plain LM, a peer checkpoint, a
    PEFT adapter, or a hub id in the local cache. The seq2seq class when the (base) config is encoder-decoder."""
    from transformers_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

    hub_kwargs = _hub_kwargs(cache_dir)
    if _is_seq2seq(source, hub_kwargs):
        return AutoModelForSeq2SeqLMWithValueHead.from_pretrained(source, **hub_kwargs)
    return AutoModelForCausalLMWithValueHead.from_pretrained(source, **hub_kwargs)


def _load_tokenizer(source: str, model, cache_dir: str | None):
    """The tokenizer saved with `source`, else with the model it was loaded from (an adapter's base); `None` if none."""
    from transformers import AutoTokenizer

    for candidate in dict.fromkeys([source, model.name_or_path]):
        if not candidate:
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate, **_hub_kwargs(cache_dir))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _check_destination(path: str, overwrite: bool = False) -> None:
    """Refuses to write into a directory that holds files (unless `overwrite`), before anything is loaded."""
    destination = Path(path)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{destination} exists and is not empty: choose a new directory, or pass --overwrite to write into it."
        )


# --- inspect -------------------------------------------------------------------------------------------------------


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _files_on_disk(source: str, cache_dir: str | None) -> int | None:
    """Bytes of the files of `source` (a directory, or a hub id's snapshot in the cache); hidden folders skipped."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, cache_dir=cache_dir, local_files_only=True))
        except (OSError, ValueError):
            return None
    files = [path for path in folder.rglob("*") if path.is_file()]
    return sum(path.stat().st_size for path in files if not path.relative_to(folder).parts[0].startswith("."))


def _layer_counts(text_config) -> tuple[int | None, int | None]:
    """`(decoder layers, encoder layers)`; a causal LM has no encoder."""
    layers = getattr(text_config, "num_hidden_layers", None)  # the encoder's, in an encoder-decoder config
    if not getattr(text_config, "is_encoder_decoder", False):
        return layers, None
    decoder = getattr(text_config, "num_decoder_layers", None) or getattr(text_config, "decoder_layers", None)
    return decoder or layers, layers


def describe_model(model, source: str, cache_dir: str | None = None) -> dict:
    """What `inspect` prints: a dict of JSON values, groups of settings as nested dicts."""
    from transformers_vhead.peft_support import without_peft

    config, head = model.config, model.v_head
    text_config = config.text_config
    language_model = without_peft(model.pretrained_model)
    hidden_layer = getattr(head, "hidden_layer", None)
    layers, encoder_layers = _layer_counts(text_config)
    disk = _files_on_disk(source, cache_dir)
    report = {
        "class": type(model).__name__,
        "base_model_type": text_config.model_type,
        "architecture": type(language_model).__name__,
        "layers": layers,
        "encoder_layers": encoder_layers,
        "hidden_size": getattr(text_config, "hidden_size", None),
        "dtype": {"stored": _dtype_name(text_config.dtype), "loaded": _dtype_name(language_model.dtype)},
        "head": {
            "input_size": (hidden_layer if hidden_layer is not None else head.summary).in_features,
            "hidden_size": None if hidden_layer is None else hidden_layer.out_features,
            "bias": head.summary.bias is not None,
            "dropout": getattr(head.dropout, "p", 0.0),
        },
        "head_source": str(model.v_head_source),
        "head_layout": model.v_head_source.layout,
        "parameters": {
            "total": sum(parameter.numel() for parameter in model.parameters()),
            "head": sum(parameter.numel() for parameter in head.parameters()),
        },
        "files": None if disk is None else {"bytes": disk, "size": _human_size(disk)},
        "normalization": None,
        "peft_adapter": None,
        "reward_adapter": model.rm_adapter_name,
    }
    if config.score_mean is not None or config.score_std is not None:
        report["normalization"] = {"mean": config.score_mean, "std": config.score_std}
    if model.is_peft_model:
        adapter = model.pretrained_model.active_peft_config
        targets = getattr(adapter, "target_modules", None)
        report["peft_adapter"] = {
            "name": model.pretrained_model.active_adapter,
            "type": getattr(adapter.peft_type, "value", adapter.peft_type),
            "r": getattr(adapter, "r", None),
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        }
    return report


def _as_text(value) -> str:
    """One `inspect` value as text: `none`, `true`/`false`, lists comma-separated, dicts as `key=value` pairs."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return " ".join(f"{key}={_as_text(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(item) for item in value)
    return str(value)


def _inspect(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.cache_dir)
    report = describe_model(model, args.model, args.cache_dir)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {_as_text(value)}")
    return 0


# --- convert, export -----------------------------------------------------------------------------------------------


def _copy_tokenizer(source: str, model, cache_dir: str | None, destination) -> str:
    """Saves the tokenizer of `source` (see `_load_tokenizer`) to `destination`; says whether there was one."""
    tokenizer = _load_tokenizer(source, model, cache_dir)
    if tokenizer is None:
        return "no tokenizer found to copy"
    tokenizer.save_pretrained(destination)
    return "tokenizer copied"


def _convert(args: argparse.Namespace) -> int:
    _check_destination(args.dst, args.overwrite)
    model = load_model(args.src, args.cache_dir)
    model.save_pretrained(args.dst, overwrite_model_card=args.overwrite)
    copied = _copy_tokenizer(args.src, model, args.cache_dir, args.dst)
    adapter = " with a PEFT adapter" if model.is_peft_model else ""
    print(f"converted {args.src}{adapter} (value head {model.v_head_source}) to {args.dst}; {copied}")
    return 0


def _export(args: argparse.Namespace) -> int:
    _check_destination(args.dst)
    from transformers_vhead import export_model

    model = load_model(args.src, args.cache_dir)
    result = export_model(model, args.dst, args.to, drop_bias=args.drop_bias)
    copied = _copy_tokenizer(args.src, model, args.cache_dir, result.directory)
    for note in result.notes:
        print(f"note: {note}")
    print(f"exported {args.src} as {result.format} to {result.directory}; {copied}")
    return 0


# --- score ---------------------------------------------------------------------------------------------------------


_UTF8_BOM = b"\xef\xbb\xbf"


def _read_texts(path: str) -> list[tuple[int, str]]:
    """`(line number, text)` for each line of `path` (`-` = stdin), checked before anything is loaded: UTF-8 (a BOM is
    dropped), no NUL byte, no blank line, at least one text. Lines end at `\n` (and a `\r` before it), so the line
    numbers are an editor's and `wc -l`'s.

    Raises:
        ValueError: the input breaks one of these rules (the message names the line, and the byte for bad bytes).
    """
    name = "stdin" if path == "-" else path
    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)  # the bytes; a text stream that has none is already decoded
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    else:
        data = Path(path).read_bytes()
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(
            f"{name} is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8, e.g. with "
            f"`iconv -f UTF-16 -t UTF-8 {name}`."
        )
    nul = data.find(b"\0", start)
    if nul >= 0:
        raise ValueError(
            f"line {_line_of(data, nul)} of {name} holds a NUL byte (at byte offset {nul} of the file): it is not a "
            "text file, or it is UTF-16 text; save the texts as UTF-8, one per line."
        )
    try:
        content = data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        column = offset - (data.rfind(b"\n", 0, offset) + 1)
        raise ValueError(
            f"line {_line_of(data, offset)} of {name} is not UTF-8: the byte {data[offset]:#04x} at byte offset "
            f"{offset} of the file (byte {column} of the line) cannot be decoded. Save the file as UTF-8, e.g. with "
            f"`iconv -f latin1 -t UTF-8 {name}`."
        ) from None
    lines = content.split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    texts = [(number, line.removesuffix("\r")) for number, line in enumerate(lines, start=1)]
    if not any(text.strip() for _, text in texts):
        held = f"its {len(texts)} line(s) are blank" if texts else "it is empty"
        raise ValueError(f"{name} holds no text to score ({held}): write one text per line.")
    for number, text in texts:
        if not text.strip():
            raise ValueError(f"line {number} of {name} is empty: each line must hold one text to score.")
    return texts


def _line_of(data: bytes, offset: int) -> int:
    """The number of the line that holds byte `offset` of `data`."""
    return data.count(b"\n", 0, offset) + 1


def _check_output(path: str | None) -> None:
    """Refuses an `--output` that cannot be written, before anything is loaded."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"--output {path} is a directory: name the file to write the scores to.")
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"the directory of --output {path} does not exist: create {folder} first.")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write --output {path}: {folder} is not writable.")


@contextmanager
def _scores_output(path: str | None) -> Iterator:
    """Where the JSON lines go: stdout, or for `--output FILE` a temporary file beside FILE that replaces it
    (`os.replace`, atomic) once the block has written every line. A block that raises leaves no temporary file, and
    FILE as it was (or absent)."""
    if path is None:
        yield sys.stdout
        return
    target = Path(path)
    if target.exists():
        mode = target.stat().st_mode & 0o7777  # an existing file keeps its permissions
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # what `open(path, "w")` would have given it
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, mode)
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _token_limit(model, tokenizer) -> tuple[int, str] | None:
    """The most tokens the model takes, and where that number comes from; `None` if neither says."""
    limits = []
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, "max_position_embeddings of its config"))
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10**12:  # transformers' "unset" is 1e30
        limits.append((tokenizer_limit, "the tokenizer's model_max_length"))
    return min(limits) if limits else None


def _encode_all(texts: list[tuple[int, str]], tokenizer, model, args: argparse.Namespace, name: str) -> list:
    """Every batch tokenised, and each text's length checked, before the first score: `(batch, encoded)` pairs.

    Raises:
        ValueError: a text that tokenises to no tokens, or to more than the model takes (names the line).
    """
    limit = _token_limit(model, tokenizer)
    batches = []
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        encoded = tokenizer(
            [text for _, text in batch],
            padding=True,
            truncation=args.max_length is not None,
            max_length=args.max_length,
            return_tensors="pt",
        )
        for (number, _), length in zip(batch, encoded["attention_mask"].sum(-1).tolist(), strict=True):
            if length == 0:
                raise ValueError(
                    f"line {number} of {name} gives no tokens with the model's tokenizer, so it has none to score: "
                    "remove it or write the text out."
                )
            if limit is not None and length > limit[0]:
                most, source = limit
                truncated = f" after truncation to --max-length {args.max_length}" if args.max_length else ""
                raise ValueError(
                    f"line {number} of {name} has {length} tokens{truncated}, more than the model takes ({most}, "
                    f"{source}): pass --max-length {most} (or less) to truncate the texts."
                )
        batches.append((batch, encoded))
    return batches


def _score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from transformers_vhead.errors import WrongModelKindError

    texts = _read_texts(args.input)
    _check_output(args.output)
    if _is_seq2seq(args.model, _hub_kwargs(args.cache_dir)):
        raise WrongModelKindError(
            f"{args.model} is a seq2seq model: scoring needs a decoder input besides the source text, which `score` "
            "cannot take. Call model.compute_sequence_scores(..., decoder_input_ids=..., decoder_attention_mask=...)."
        )
    model = load_model(args.model, args.cache_dir).to(args.device)
    tokenizer = _load_tokenizer(args.model, model, args.cache_dir)
    if tokenizer is None:
        raise FileNotFoundError(
            f"No tokenizer found in {args.model} (nor in {model.name_or_path}): save one next to the model with "
            "tokenizer.save_pretrained(path)."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"The tokenizer of {args.model} has neither a pad nor an eos token to pad batches with.")
    tokenizer.padding_side = "right"
    batches = _encode_all(texts, tokenizer, model, args, "stdin" if args.input == "-" else args.input)
    if not model.v_head_source.is_loaded and not model.supports_rm_adapter:
        print(f"{PROG}: warning: value head {model.v_head_source}: these scores are random.", file=sys.stderr)

    show_progress = not args.no_progress and len(batches) > 1 and sys.stderr.isatty()
    with (
        _scores_output(args.output) as output,
        tqdm(total=len(texts), unit="text", file=sys.stderr, disable=not show_progress) as progress,
    ):
        for batch, encoded in batches:
            encoded = encoded.to(args.device)
            scores = model.compute_sequence_scores(
                encoded["input_ids"], encoded["attention_mask"], normalize=args.normalize
            )
            for (number, text), score in zip(batch, scores.tolist(), strict=True):
                print(json.dumps({"line": number, "text": text, "score": score}, ensure_ascii=False), file=output)
            if output is sys.stdout:
                output.flush()
            progress.update(len(batch))
    return 0


# --- demo ----------------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from transformers_vhead.demo import run_demo

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="transformers-vhead-demo-")
    result = run_demo(output_dir)
    print(f"saved a value-head model to {result.model_dir}")
    print(f"AutoModelForCausalLM.from_pretrained -> {result.model_class}")
    print(f"generated (greedy): {result.generated_text!r}")
    print("token        value")
    for token, value in result.token_values:
        print(f"{token:<12} {value:+.4f}")
    # Reloaded tensors are memory-mapped, so a kernel may sum in another order: equal weights, values within 1 ulp.
    print(f"weights after reload identical: {result.weights_identical}")
    print(f"largest value difference after reload: {result.max_value_difference:.1e}")
    return 0 if result.weights_identical and result.max_value_difference < 1e-5 else 1


# --- the parser ----------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_command(commands, name: str, run, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    command = commands.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, min(100, shutil.get_terminal_size().columns - 2)),  # as argparse
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.set_defaults(run=run)
    return command


def _add_cache_dir(command: argparse.ArgumentParser) -> None:
    command.add_argument("--cache-dir", help="the hub cache to read hub ids from (default: the standard cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Value-head language models for Hugging Face transformers.")
    parser.add_argument("--verbose", action="store_true", help="show transformers' logging and progress bars")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = _add_command(
        commands,
        "demo",
        _demo,
        "build a tiny model, save it, reload it through AutoModelForCausalLM, generate, compute values",
        "Builds a tiny Llama with a value head, saves it, reloads it through AutoModelForCausalLM, generates from a "
        "prompt and prints the value of each generated token. Nothing is downloaded.",
        f"{PROG} demo --output-dir /tmp/vhead-demo",
    )
    demo.add_argument("--output-dir", help="where to save the demo models (default: a new temporary directory)")

    inspect = _add_command(
        commands,
        "inspect",
        _inspect,
        "describe a value-head model: base model, head, where the head came from, sizes",
        "Loads a model on CPU (a directory saved by transformers-vhead, a plain language model, a TRL or other "
        "peer checkpoint, a PEFT adapter, or a hub id in the local cache) and prints one `key: value` line per "
        "property: class, base model type and architecture, layers, hidden size, dtype as stored and as loaded, the "
        "value head and where it came from, parameter counts, the size of the files, reward normalisation, and any "
        "PEFT or reward adapter.",
        f"{PROG} inspect org/ppo-critic --json",
    )
    inspect.add_argument("model", metavar="PATH_OR_ID", help="a local directory or a hub id")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    _add_cache_dir(inspect)

    convert = _add_command(
        commands,
        "convert",
        _convert,
        "load any supported layout and save it in transformers-vhead's own layout",
        "Loads a checkpoint in any layout transformers-vhead reads (TRL, OpenRLHF, LLaMA-Factory, trlx, verl, HF "
        "sequence classification, a PEFT adapter, a plain language model) and saves it natively with "
        "save_pretrained, with its tokenizer (from SRC, or from an adapter's base model). The result loads with "
        "AutoModelForCausalLM.from_pretrained after `import transformers_vhead`.",
        f"{PROG} convert ./trl-ppo-checkpoint ./critic",
    )
    convert.add_argument("src", metavar="SRC", help="the checkpoint to read: a directory or a hub id")
    convert.add_argument("dst", metavar="DST", help="the directory to write (new or empty)")
    convert.add_argument("--overwrite", action="store_true", help="write into DST even when it holds files")
    _add_cache_dir(convert)

    export = _add_command(
        commands,
        "export",
        _export,
        "write a value-head model in a format other tools read",
        "Loads a model and writes it for other tools: `causal-lm` / `seq2seq-lm` is the plain language model without "
        "the head (generation, serving engines); `seq-cls` an AutoModelForSequenceClassification whose score is the "
        "value head (TRL's PPOTrainer value model, OpenRLHF); `trl` TRL 1.12's layout. A PEFT policy is merged into "
        "the base weights. The tokenizer is copied, and what the format dropped or changed is printed as notes.",
        f"{PROG} export ./critic ./critic-seq-cls --to seq-cls",
    )
    export.add_argument("src", metavar="SRC", help="the model to read: a directory or a hub id")
    export.add_argument("dst", metavar="DST", help="the directory to write (new or empty)")
    export.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="the format to write")
    export.add_argument(
        "--drop-bias",
        action="store_true",
        help="seq-cls only: export even though the score head has no place for the value head's bias",
    )
    _add_cache_dir(export)

    score = _add_command(
        commands,
        "score",
        _score,
        "score texts, one per line, with a value-head or reward model",
        "Scores each line of a file (`-` reads stdin) with model.compute_sequence_scores: the value (or the reward "
        "adapter's score) at the last token of the text, tokenised with the model's tokenizer (padding on the right "
        "with the eos token when it has no pad token). Prints one JSON object per line: "
        '{"line": n, "text": ..., "score": ...}; with --output FILE they are written to FILE instead, through a '
        "temporary file beside it that replaces FILE once every line is scored, so a failure leaves no partial FILE "
        "(and an existing one as it was). Every line is read, checked and tokenised before the first score: a blank "
        "line, bytes that are not UTF-8, a NUL byte, or a text longer than the model takes (when --max-length is not "
        "given) is an error naming the line, and nothing is written. Causal models only.",
        f"{PROG} score ./reward-model --input answers.txt --normalize --output scores.jsonl",
    )
    score.add_argument("model", metavar="MODEL", help="a local directory or a hub id")
    score.add_argument("--input", required=True, metavar="FILE", help="the texts, one per line (`-` for stdin)")
    score.add_argument("--batch-size", type=_positive_int, default=8, help="texts per forward (default: 8)")
    score.add_argument(
        "--normalize", action="store_true", help="return (score - mean) / std with the statistics saved with the model"
    )
    score.add_argument("--max-length", type=_positive_int, help="truncate texts to this many tokens")
    score.add_argument(
        "--output",
        metavar="FILE",
        help="write the JSON lines to FILE (replaced at once when every line is scored) instead of stdout",
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal)")
    score.add_argument("--device", default="cpu", help="where to run the model, e.g. cuda:0 (default: cpu)")
    _add_cache_dir(score)
    return parser


@contextmanager
def _quiet_logging(verbose: bool) -> Iterator[None]:
    """transformers' warnings and progress bars, and this package's warnings, off for the block (unless `verbose`);
    put back as they were afterwards."""
    if verbose:
        yield
        return
    from transformers.utils import logging as transformers_logging

    package_logger = logging.getLogger("transformers_vhead")
    verbosity, level = transformers_logging.get_verbosity(), package_logger.level
    progress_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    package_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()
        package_logger.setLevel(level)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    if isinstance(error, KeyError) or not message:
        return f"{type(error).__name__}: {message}".rstrip(": ")
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _quiet_logging(args.verbose):
            return args.run(args)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
