#!/usr/bin/env python3
"""The llm-compressor side of the quantops GPU benchmark.

One script, four subcommands, each printing one JSON line of results on
stdout (logs go to stderr):

``make-llama1b``
    Builds the Llama-3.2-1B-shaped model of ``shared/BENCHMARKS.md`` with
    random bf16 weights, saves it as a loadable checkpoint directory and
    writes random calibration token ids as JSON.
``make-sharded``
    Writes a random Llama-shaped checkpoint one decoder layer per shard,
    spreading the shards over several directories (disk and ``/dev/shm``)
    so that a model larger than the GPU, and than either filesystem, fits.
``quantize``
    Runs llm-compressor's ``oneshot`` (GPTQ or RTN/FP8) on a checkpoint with
    those token ids and saves the result with ``save_compressed=True``,
    timing ``oneshot`` and the whole run.
``perplexity``
    Token-level perplexity of any dense or compressed-tensors checkpoint in
    fp32, over non-overlapping windows of a text file, computed exactly as
    ``quantizer-job/src/eval/perplexity.rs`` does (whole file tokenized as one
    string without special tokens, no BOS, partial tail dropped,
    ``window - 1`` predictions per window).

The script writes only to the paths given on its command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

#: Tokenizer files copied next to a made or quantized checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)

#: Llama-3.2-1B shapes (shared/BENCHMARKS.md).
LLAMA_1B = {
    "vocab": 128256,
    "hidden": 2048,
    "intermediate": 8192,
    "layers": 16,
    "heads": 32,
    "kv_heads": 8,
}

SCHEMES = ("W4A16", "W4A16_ASYM", "FP8_DYNAMIC")
METHODS = ("gptq", "rtn")
GIB = float(1 << 30)


def log(message: str) -> None:
    """Write a progress line to stderr, keeping stdout for JSON results."""
    print(f"[reference] {message}", file=sys.stderr, flush=True)


#: Where JSON result lines go: the process's original stdout (see main()).
RESULTS = sys.stdout


def emit(record: dict) -> None:
    """Print one JSON result line to the original stdout."""
    print(json.dumps(record), file=RESULTS, flush=True)


def keep_stdout_for_results() -> None:
    """Send everything else written to stdout to stderr instead.

    llm-compressor logs to ``sys.stdout`` (loguru) and its modifier factory
    prints import errors there; the results must stay one clean JSON line.
    File descriptor 1 becomes a copy of stderr, and ``RESULTS`` keeps a
    duplicate of the original stdout.
    """
    global RESULTS
    sys.stdout.flush()
    RESULTS = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)


def pick_device(name: str) -> torch.device:
    """Resolve ``auto`` to CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cuda_sync() -> None:
    """Wait for queued GPU work, if there is a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    """Peak GPU memory allocated by this process so far, in GiB."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / GIB, 3)


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` into ``dst``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------
# make-llama1b
# --------------------------------------------------------------------------


def make_llama1b(args: argparse.Namespace) -> dict:
    """Build, save and describe the random Llama-shaped checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = Path(args.out)
    tok_dir = Path(args.tokenizer_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise SystemExit(f"{tok_dir}/tokenizer.json not found")
    device = pick_device(args.device)
    start = time.perf_counter()

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    del model
    copied = copy_tokenizer(tok_dir, out)
    calib = write_calibration(args)
    return made_record(args, params, copied, calib, device, start)


def write_calibration(args: argparse.Namespace) -> Path:
    """Write ``--samples`` × ``--seq-len`` random token ids to ``--calib-out``.

    The ids come from a CPU generator seeded by ``--seed``, so any machine
    writes the same ones.
    """
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(
        0,
        args.vocab,
        (args.samples, args.seq_len),
        generator=gen,
        dtype=torch.int64,
    )
    calib = Path(args.calib_out)
    calib.parent.mkdir(parents=True, exist_ok=True)
    with calib.open("w", encoding="utf-8") as fh:
        json.dump({"input_ids": ids.tolist()}, fh, separators=(",", ":"))
    return calib


def made_record(
    args: argparse.Namespace,
    params: int,
    copied: list[str],
    calib: Path,
    device: torch.device,
    start: float,
) -> dict:
    """Describe a made checkpoint: its shapes, files and calibration ids."""
    return {
        "made": str(Path(args.out)),
        "params": params,
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "tokenizer_files": copied,
        "calib": str(calib),
        "samples": args.samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 3),
    }


# --------------------------------------------------------------------------
# make-sharded
# --------------------------------------------------------------------------


def shard_places(specs: list[str]) -> list[tuple[Path, float]]:
    """Parse ``DIR=GB`` entries: where shards go and how many GB each takes."""
    places = []
    for spec in specs:
        path, sep, gb = spec.rpartition("=")
        if not sep or not path:
            raise SystemExit(f"--shard-dir {spec!r}: expected DIR=GB")
        places.append((Path(path), float(gb)))
    return places


def make_sharded(args: argparse.Namespace) -> dict:
    """Write a random Llama-shaped checkpoint one shard per decoder layer.

    The model is never whole in memory: each layer's tensors are drawn on
    the GPU (or CPU), saved as one safetensors shard and dropped. Shards go
    to the ``--shard-dir DIR=GB`` places in turn, each filled up to its GB,
    and are linked from ``--out`` with the index, so a model larger than
    any one filesystem (and than the GPU) can be made where RAM-backed
    ``/dev/shm`` and the disk together hold it.
    """
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    places = shard_places(args.shard_dir) or [(out, float("inf"))]
    device = pick_device(args.device)
    start = time.perf_counter()
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "dtype": "bfloat16",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": head_dim,
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    copied = copy_tokenizer(Path(args.tokenizer_dir), out)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen, device=device) * 0.02
        return w.to(torch.bfloat16).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    def shard(i: int) -> dict[str, torch.Tensor]:
        if i == 0:
            return {
                "model.embed_tokens.weight": rand(args.vocab, args.hidden),
                "model.norm.weight": ones(args.hidden),
            }
        p = f"model.layers.{i - 1}."
        h, m = args.hidden, args.intermediate
        return {
            p + "input_layernorm.weight": ones(h),
            p + "post_attention_layernorm.weight": ones(h),
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(m, h),
            p + "mlp.up_proj.weight": rand(m, h),
            p + "mlp.down_proj.weight": rand(h, m),
        }

    count = args.layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    place, used, placed = 0, 0.0, {}
    for i in range(count):
        tensors = shard(i)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        while place < len(places) - 1 and used + size / 1e9 > places[place][1]:
            place, used = place + 1, 0.0
        where = places[place][0]
        where.mkdir(parents=True, exist_ok=True)
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(where / name), metadata={"format": "pt"})
        if where.resolve() != out.resolve():
            link = out / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to((where / name).resolve())
        used += size / 1e9
        total += size
        placed[str(where)] = placed.get(str(where), 0) + size
        weight_map.update({t: name for t in tensors})
        log(f"shard {i + 1}/{count} ({size / 1e9:.2f} GB) in {where}")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=1), encoding="utf-8"
    )

    calib = write_calibration(args)
    record = made_record(args, total // 2, copied, calib, device, start)
    record.update(bytes=total, gib=round(total / GIB, 2), bytes_by_place=placed)
    return record


# --------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------


def load_calibration(path: Path, samples: int | None, seq_len: int | None):
    """Read ``{"input_ids": [[...], ...]}`` and cut it to samples × seq_len.

    Returns a ``datasets.Dataset`` with ``input_ids`` and ``attention_mask``
    columns: llm-compressor 0.14 uses a dataset that already has
    ``input_ids`` as is, with no tokenizer and no hub download.
    """
    from datasets import Dataset

    with path.open(encoding="utf-8") as fh:
        rows = json.load(fh)["input_ids"]
    if samples is not None:
        if samples > len(rows):
            raise SystemExit(
                f"{path} holds {len(rows)} samples, {samples} asked"
            )
        rows = rows[:samples]
    if seq_len is not None:
        short = min(len(r) for r in rows)
        if seq_len > short:
            raise SystemExit(
                f"{path} rows hold {short} tokens, {seq_len} asked"
            )
        rows = [r[:seq_len] for r in rows]
    masks = [[1] * len(r) for r in rows]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": masks})


def build_recipe(method: str, scheme: str, args: argparse.Namespace):
    """Return the llm-compressor modifier for a method and preset scheme."""
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(
            targets="Linear",
            ignore=["lm_head"],
            scheme=scheme,
            block_size=args.block_size,
            dampening_frac=args.dampening_frac,
        )
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(
        targets="Linear", ignore=["lm_head"], scheme=scheme
    )


def quantize(args: argparse.Namespace) -> dict:
    """Run llm-compressor ``oneshot`` and save a compressed checkpoint."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model_dir = Path(args.model)
    out = Path(args.out)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cuda_sync()
    t_start = time.perf_counter()

    load_kwargs = {"dtype": "auto"}
    if args.load_device != "cpu":
        load_kwargs["device_map"] = args.load_device
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs)
    recipe = build_recipe(args.method, args.scheme, args)

    oneshot_kwargs = {}
    samples = seq_len = None
    if args.method == "gptq":
        dataset = load_calibration(
            Path(args.calib), args.samples, args.seq_len
        )
        samples = len(dataset)
        seq_len = len(dataset[0]["input_ids"])
        oneshot_kwargs = {
            "dataset": dataset,
            "num_calibration_samples": samples,
            "max_seq_length": seq_len,
        }
    cuda_sync()
    t_load = time.perf_counter()
    load_peak = peak_gib()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # oneshot shuffles the calibration rows with torch's global generator.
    torch.manual_seed(args.seed)
    cuda_sync()
    t0 = time.perf_counter()
    model = oneshot(model=model, recipe=recipe, **oneshot_kwargs)
    cuda_sync()
    t1 = time.perf_counter()
    oneshot_peak = peak_gib()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    copy_tokenizer(model_dir, out)
    cuda_sync()
    t_end = time.perf_counter()
    save_peak = peak_gib()
    peaks = [p for p in (load_peak, oneshot_peak, save_peak) if p is not None]

    return {
        "tool": "llm-compressor",
        "method": args.method,
        "scheme": args.scheme,
        "oneshot_s": round(t1 - t0, 3),
        "total_s": round(t_end - t_start, 3),
        "load_s": round(t_load - t_start, 3),
        "save_s": round(t_end - t1, 3),
        "peak_gpu_gib": max(peaks) if peaks else None,
        "oneshot_peak_gpu_gib": oneshot_peak,
        "samples": samples,
        "seq_len": seq_len,
        "load_device": args.load_device,
        "seed": args.seed,
        "out": str(out),
    }


# --------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------


def load_for_eval(model_dir: Path, device: torch.device):
    """Load a dense or compressed-tensors checkpoint as an fp32 model.

    A compressed-tensors checkpoint is dequantized at load time
    (``CompressedTensorsConfig(dequantize=True)``): the matmuls run in fp32
    on the dequantized weights; activations are still fake-quantized where
    the scheme says so (see :func:`activation_quant`). Returns the model and
    the checkpoint's ``quant_method`` (None for a dense one).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    kwargs = {"dtype": torch.float32}
    qconfig = getattr(config, "quantization_config", None)
    quant_method = None
    if qconfig is not None:
        quant_method = (
            qconfig.get("quant_method")
            if isinstance(qconfig, dict)
            else getattr(qconfig, "quant_method", None)
        )
        quant_method = getattr(quant_method, "value", quant_method)
    if quant_method == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(
            dequantize=True
        )
    # Placed on the device at load, so decompression hooks cannot leave
    # modules behind on the CPU.
    kwargs["device_map"] = str(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model = model.float().eval()
    return model, quant_method


def activation_quant(model, enabled: bool) -> int:
    """Count (and optionally switch off) activation fake-quantization.

    A compressed-tensors checkpoint loaded with ``dequantize=True`` keeps
    compressed-tensors' quantized forward on every quantized module: the
    weights are already dequantized (and are not quantized again), and
    activations are fake-quantized where the scheme says so (FP8_DYNAMIC:
    per-token dynamic FP8 inputs), as llm-compressor's own evaluation does.
    With ``enabled=False`` that forward is disabled (``quantization_enabled
    = False``), leaving dequantized weights with fp32 activations.
    Returns the number of modules whose activations are fake-quantized.
    """
    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        quantizes_activations = (
            scheme.input_activations is not None
            or scheme.output_activations is not None
        )
        if not enabled:
            module.quantization_enabled = False
        elif quantizes_activations:
            count += 1
    return count


def read_tokens(model_dir: Path, text_path: Path) -> list[int]:
    """Tokenize the whole file as one string, without special tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = text_path.read_text(encoding="utf-8")
    return tokenizer.encode(text, add_special_tokens=False).ids


def perplexity(args: argparse.Namespace) -> dict:
    """exp(mean NLL) over non-overlapping windows of the text, in fp32."""
    model_dir = Path(args.model)
    device = pick_device(args.device)
    if device.type == "cuda":
        # fp32 evaluation: no TF32 in matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tokens = read_tokens(model_dir, Path(args.text))
    window = args.seq_len
    if window < 2:
        raise SystemExit("--seq-len must be at least 2")
    windows = len(tokens) // window
    if args.windows is not None:
        windows = min(windows, args.windows)
    if windows == 0:
        raise SystemExit(
            f"{args.text} has {len(tokens)} tokens, under one window"
        )
    ids = torch.tensor(tokens[: windows * window], dtype=torch.long)
    ids = ids.view(windows, window)

    model, quant_method = load_for_eval(model_dir, device)
    act_quant_modules = activation_quant(model, enabled=not args.weights_only)
    start = time.perf_counter()
    total_nll = 0.0
    with torch.inference_mode():
        for first in range(0, windows, args.batch):
            last = first + args.batch
            batch = ids[first:last].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            target = batch[:, 1:].unsqueeze(-1).to(logp.device)
            total_nll -= logp.gather(-1, target).double().sum().item()
    cuda_sync()
    seconds = time.perf_counter() - start
    predicted = windows * (window - 1)
    mean_nll = total_nll / predicted
    return {
        "model": str(model_dir),
        "perplexity": round(math.exp(mean_nll), 4),
        "mean_nll": round(mean_nll, 6),
        "windows": windows,
        "tokens": predicted,
        "window_tokens": window,
        "text_tokens": len(tokens),
        "quant_method": quant_method,
        "act_quant_modules": act_quant_modules,
        "device": str(device),
        "seconds": round(seconds, 3),
    }


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the three subcommands."""
    top = argparse.ArgumentParser(
        description="llm-compressor side of the quantops GPU benchmark"
    )
    sub = top.add_subparsers(dest="command", required=True)

    make = sub.add_parser(
        "make-llama1b", help="random Llama-3.2-1B-shaped model"
    )
    make.add_argument(
        "--out", required=True, help="checkpoint directory to write"
    )
    make.add_argument(
        "--tokenizer-dir",
        required=True,
        help="directory holding tokenizer.json",
    )
    make.add_argument(
        "--calib-out", required=True, help="calibration JSON to write"
    )
    make.add_argument("--samples", type=int, default=128)
    make.add_argument("--seq-len", type=int, default=2048)
    make.add_argument(
        "--seed", type=int, default=0, help="calibration ids' seed"
    )
    make.add_argument("--layers", type=int, default=LLAMA_1B["layers"])
    make.add_argument("--hidden", type=int, default=LLAMA_1B["hidden"])
    make.add_argument(
        "--intermediate", type=int, default=LLAMA_1B["intermediate"]
    )
    make.add_argument("--vocab", type=int, default=LLAMA_1B["vocab"])
    make.add_argument("--heads", type=int, default=LLAMA_1B["heads"])
    make.add_argument("--kv-heads", type=int, default=LLAMA_1B["kv_heads"])
    make.add_argument("--device", default="auto", help="auto, cuda or cpu")
    make.set_defaults(func=make_llama1b)

    sharded = sub.add_parser(
        "make-sharded",
        help="random Llama-shaped model, one shard per layer, spread over places",
    )
    sharded.add_argument("--out", required=True, help="checkpoint directory")
    sharded.add_argument(
        "--tokenizer-dir",
        required=True,
        help="directory holding tokenizer.json",
    )
    sharded.add_argument(
        "--shard-dir",
        action="append",
        default=[],
        metavar="DIR=GB",
        help="where shards go, in turn, and how many GB each place takes",
    )
    sharded.add_argument(
        "--calib-out", required=True, help="calibration JSON to write"
    )
    sharded.add_argument("--samples", type=int, default=16)
    sharded.add_argument("--seq-len", type=int, default=512)
    sharded.add_argument("--seed", type=int, default=0)
    sharded.add_argument("--layers", type=int, required=True)
    sharded.add_argument("--hidden", type=int, required=True)
    sharded.add_argument("--intermediate", type=int, required=True)
    sharded.add_argument("--vocab", type=int, default=LLAMA_1B["vocab"])
    sharded.add_argument("--heads", type=int, required=True)
    sharded.add_argument("--kv-heads", type=int, required=True)
    sharded.add_argument("--device", default="auto", help="auto, cuda or cpu")
    sharded.set_defaults(func=make_sharded)

    quant = sub.add_parser("quantize", help="llm-compressor oneshot")
    quant.add_argument("--model", required=True, help="checkpoint directory")
    quant.add_argument("--calib", help="calibration JSON (needed for gptq)")
    quant.add_argument("--scheme", required=True, choices=SCHEMES)
    quant.add_argument("--method", required=True, choices=METHODS)
    quant.add_argument("--out", required=True, help="directory to save into")
    quant.add_argument(
        "--samples", type=int, help="calibration rows (default all)"
    )
    quant.add_argument(
        "--seq-len", type=int, help="tokens a row (default all)"
    )
    quant.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch seed set before oneshot (it shuffles calibration rows)",
    )
    quant.add_argument("--block-size", type=int, default=128)
    quant.add_argument("--dampening-frac", type=float, default=0.01)
    quant.add_argument(
        "--load-device",
        default="cpu",
        help="where the model is loaded before oneshot: cpu (llm-compressor's"
        " documented flow; its pipelines onload layers to the GPU) or cuda",
    )
    quant.set_defaults(func=quantize)

    ppl = sub.add_parser("perplexity", help="fp32 windowed perplexity")
    ppl.add_argument("--model", required=True, help="checkpoint directory")
    ppl.add_argument("--text", required=True, help="UTF-8 text file")
    ppl.add_argument(
        "--windows", type=int, help="at most this many (default all)"
    )
    ppl.add_argument(
        "--seq-len", type=int, default=512, help="tokens a window"
    )
    ppl.add_argument(
        "--batch", type=int, default=4, help="windows a forward pass"
    )
    ppl.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ppl.add_argument(
        "--weights-only",
        action="store_true",
        help="switch off activation fake-quantization (FP8_DYNAMIC inputs): "
        "dequantized weights, fp32 activations; default keeps what the "
        "checkpoint's scheme does",
    )
    ppl.set_defaults(func=perplexity)
    return top


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the subcommand, print its JSON line."""
    args = parser().parse_args(argv)
    if args.command == "quantize" and args.method == "gptq" and not args.calib:
        raise SystemExit("quantize --method gptq needs --calib")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_stdout_for_results()
    emit(args.func(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
