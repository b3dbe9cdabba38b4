"""A variant against its base model on fixed image+text prompts.

A compressed-tensors variant and its base are both served by vLLM. An ONNX variant
(``python -m export onnx``) runs on ONNX Runtime (``engine.onnx_model``) against the base in
PyTorch float32 (transformers), and adds the **first-step logit difference**: the largest
absolute difference of the two models' logits at the first generated position (one forward
over the same prompt, image included), which an FP32 export must keep within 1e-3.

1. Each model, in its own process (one vLLM engine at a time), answers the same fixed chats
   (a generated product photo + a question each) greedily for ``tokens`` tokens, returning
   its top-``TOP_K`` log-probabilities at every position.
2. **Greedy token agreement**: the share of positions where the variant's greedy token equals
   the base's, position by position (after a first difference the contexts differ, so
   later positions mostly disagree too: the score punishes early divergence).
3. **Mean KL(base || variant)** of the next-token distributions, over the positions whose
   contexts are still identical (up to and including the first difference). The
   distributions are the top-``TOP_K`` log-probs renormalised over their union; a token one
   model lacks gets the other's smallest listed probability.
4. Pass when agreement >= ``min_agreement`` and mean KL <= ``max_kl`` (and, for an FP32 ONNX
   variant, the first-step logit difference <= ``max_logit_diff``); a table is printed and the
   numbers are saved as JSON.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

TOP_K = 20
NUM_PROMPTS = 8


def prompts(count: int = NUM_PROMPTS) -> list[list[dict]]:
    """Fixed chats: a product photo the project draws (seeded) and a question each."""
    from fixtures.images import QUESTIONS, draw_image, encode_image

    chats = []
    for i in range(count):
        image = encode_image(draw_image("product", (224, 224), seed=10_000 + i), "png")
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        chats.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
                    ],
                }
            ]
        )
    return chats


def _score(model_dir: str, chats: list, tokens: int) -> list[dict]:
    """Runs in a fresh process: greedy tokens and top-k log-probs for every chat. The engine
    runs inside this process (no engine-core or worker process: each would import vLLM
    again, ~35 s of a 40 s start on 2 CPU cores; the scores are the same)."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        max_model_len=2048,
        max_num_seqs=8,
        seed=0,
        enforce_eager=True,
        distributed_executor_backend="uni",
        limit_mm_per_prompt={"image": 1, "video": 0},
        max_logprobs=TOP_K,
    )
    params = SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=TOP_K, ignore_eos=True)
    results = []
    for output in llm.chat(chats, params, use_tqdm=False):
        completion = output.outputs[0]
        steps = [{str(t): lp.logprob for t, lp in step.items()} for step in completion.logprobs]
        results.append({"tokens": list(completion.token_ids), "logprobs": steps})
    return results


def run_model(model_dir: Path, chats: list, tokens: int) -> list[dict]:
    """``_score`` in a fresh interpreter (vLLM starts its own engine processes; a fresh
    process per model frees everything in between)."""
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"model": str(model_dir), "chats": chats, "tokens": tokens}))
        code = (
            "import json, sys; from export.compare import _score; "
            "j = json.load(open(sys.argv[1])); "
            "json.dump(_score(j['model'], j['chats'], j['tokens']), open(sys.argv[2], 'w'))"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(job), str(result)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=900,
        )
        return json.loads(result.read_text())


def is_onnx(model_dir: Path) -> bool:
    return (Path(model_dir) / "onnx_config.json").exists()


def _images_of(chat: list[dict]) -> tuple[list[dict], list]:
    """A chat with its data-URL images decoded: (messages for a chat template with image
    placeholders, the PIL images in order)."""
    import io

    from PIL import Image

    messages, images = [], []
    for message in chat:
        parts = []
        for part in message["content"]:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        messages.append({**message, "content": parts})
    return messages, images


def _top(logits, k: int = TOP_K) -> dict[str, float]:
    import numpy as np

    shifted = logits - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best = np.argsort(-logprobs)[:k]
    return {str(int(t)): float(logprobs[t]) for t in best}


def score_torch(model_dir: Path, chats: list, tokens: int) -> list[dict]:
    """Greedy tokens and top-k log-probs of the base in PyTorch float32, with its first-step
    logits (``first_logits``)."""
    import numpy as np
    import torch
    from transformers import AutoProcessor, GenerationConfig, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    # plain greedy on the raw logits, never stopping early (as the ONNX side runs)
    greedy = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    results = []
    for chat in chats:
        messages, images = _images_of(chat)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(
            text=[text], images=images or None, return_tensors="pt", add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(
                **inputs,
                generation_config=greedy,
                max_new_tokens=tokens,
                output_logits=True,
                return_dict_in_generate=True,
            )
        steps = [step[0].float().numpy() for step in out.logits]
        results.append(
            {
                "tokens": [int(np.argmax(s)) for s in steps],
                "logprobs": [_top(s) for s in steps],
                "first_logits": steps[0],
            }
        )
    return results


def score_onnx(model_dir: Path, chats: list, tokens: int) -> list[dict]:
    """The same from the ONNX variant on ONNX Runtime (greedy, end tokens not stopping it)."""
    import numpy as np

    from engine.onnx_model import OnnxModel

    model = OnnxModel(model_dir)
    results = []
    for chat in chats:
        messages, images = _images_of(chat)
        conversation = [
            {
                **m,
                "content": [
                    {"type": "image_pil", "image_pil": images.pop(0)} if p["type"] == "image" else p
                    for p in m["content"]
                ],
            }
            for m in messages
        ]
        logits, sequence = model.prefill(model.render(conversation))
        steps = [logits]
        while len(steps) < tokens:
            sequence.tokens.append(int(np.argmax(steps[-1])))
            steps.append(model.decode([sequence], [sequence.tokens[-1]])[0])
        results.append(
            {
                "tokens": [int(np.argmax(s)) for s in steps],
                "logprobs": [_top(s) for s in steps],
                "first_logits": steps[0],
            }
        )
    return results


def kl_divergence(base: dict[str, float], variant: dict[str, float]) -> float:
    """KL(base || variant) over the union of two top-k log-prob dicts (see module doc)."""
    floor_base, floor_variant = min(base.values()), min(variant.values())
    keys = base.keys() | variant.keys()
    p = {k: math.exp(base.get(k, floor_base)) for k in keys}
    q = {k: math.exp(variant.get(k, floor_variant)) for k in keys}
    p_total, q_total = sum(p.values()), sum(q.values())
    return sum(p[k] / p_total * math.log((p[k] / p_total) / (q[k] / q_total)) for k in keys)


def score(base: list[dict], variant: list[dict]) -> dict:
    agree = total = 0
    kls: list[float] = []
    per_prompt = []
    for b, v in zip(base, variant, strict=True):
        same = [x == y for x, y in zip(b["tokens"], v["tokens"], strict=False)]
        first_diff = same.index(False) if False in same else len(same)
        prompt_kls = [
            kl_divergence(b["logprobs"][i], v["logprobs"][i])
            for i in range(min(first_diff + 1, len(same)))
        ]
        agree, total = agree + sum(same), total + len(same)
        kls += prompt_kls
        per_prompt.append(
            {
                "agreement": sum(same) / len(same),
                "first_difference": first_diff,
                "mean_kl": sum(prompt_kls) / len(prompt_kls),
            }
        )
    return {
        "greedy_token_agreement": agree / total,
        "mean_kl": sum(kls) / len(kls),
        "prompts": per_prompt,
    }


def compare(
    base_dir: Path,
    variant_dir: Path,
    tokens: int = 32,
    min_agreement: float = 0.9,
    max_kl: float = 0.05,
    out: Path | None = None,
    max_logit_diff: float = 1e-3,
) -> dict:
    chats = prompts()
    onnx = is_onnx(variant_dir)
    if onnx:
        base, variant = score_torch(base_dir, chats, tokens), score_onnx(variant_dir, chats, tokens)
    else:
        base, variant = run_model(base_dir, chats, tokens), run_model(variant_dir, chats, tokens)
    result = score(base, variant)
    passed = result["greedy_token_agreement"] >= min_agreement and result["mean_kl"] <= max_kl
    thresholds = {"min_agreement": min_agreement, "max_kl": max_kl}
    if onnx:
        import numpy as np

        diff = max(
            float(np.abs(b["first_logits"] - v["first_logits"]).max())
            for b, v in zip(base, variant, strict=True)
        )
        quantization = json.loads((variant_dir / "onnx_config.json").read_text())["quantization"]
        result |= {"max_abs_logit_diff_first_step": diff, "onnx_quantization": quantization}
        if quantization == "fp32":
            thresholds["max_logit_diff"] = max_logit_diff
            passed = passed and diff <= max_logit_diff
    result |= {
        "base": str(base_dir),
        "variant": str(variant_dir),
        "reference": "pytorch-fp32" if onnx else "vllm",
        "tokens": tokens,
        "top_k": TOP_K,
        "thresholds": thresholds,
        "passed": passed,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def table(result: dict) -> str:
    t = result["thresholds"]
    lines = [
        "| prompt | greedy agreement | first difference | mean KL |",
        "|---|---|---|---|",
        *(
            f"| {i} | {p['agreement']:.2f} | {p['first_difference']} | {p['mean_kl']:.4f} |"
            for i, p in enumerate(result["prompts"])
        ),
        f"| **all** | **{result['greedy_token_agreement']:.3f}** (>= {t['min_agreement']}) | "
        f"| **{result['mean_kl']:.4f}** (<= {t['max_kl']}) |",
        "",
        *(
            [
                f"first-step max |logit difference| vs PyTorch FP32: "
                f"{result['max_abs_logit_diff_first_step']:.2e}"
                + (f" (<= {t['max_logit_diff']:g})" if "max_logit_diff" in t else ""),
                "",
            ]
            if "max_abs_logit_diff_first_step" in result
            else []
        ),
        f"{'PASS' if result['passed'] else 'FAIL'}: {result['variant']} vs {result['base']}",
    ]
    return "\n".join(lines)
