"""What the harness sends: synthetic image+text chat requests, or recorded ones replayed.

A workload spec is ``KIND[+KIND...][:key=value,...]``:

- ``product`` (768x768 JPEG product shot), ``phone`` (4032x3024 JPEG phone photo),
  ``screenshot`` (1170x2532 PNG, a tall phone screenshot), ``mixed`` (the three in turn),
  ``text`` (no image). Options: ``size=WxH``, ``format=jpeg|png|webp``, ``images=N`` per request,
  ``schema=product|product-zh``: ask for product tags as JSON (``response_format`` with that
  schema of ``fixtures.schemas``; the model stops when the JSON is complete, so ``ignore_eos``
  is not sent).
- ``jsonl:FILE``: one recorded request per line, ``{"messages": [...], "max_tokens": 64}``.

Every synthetic image is drawn from its own seed, so no two requests carry the same pixels and
no cache (vLLM's multimodal processor cache hashes pixels, not bytes) can serve a repeat.
Questions come from a built-in e-commerce and customer-service set in Chinese and English.
"""

from __future__ import annotations

import base64
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fixtures.images import QUESTIONS, draw_image, encode_image
from fixtures.schemas import SCHEMAS, response_format

IMAGE_KINDS = {
    "product": ((768, 768), "jpeg"),
    "phone": ((4032, 3024), "jpeg"),
    "screenshot": ((1170, 2532), "png"),
}
_MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: its OpenAI chat body and a label for reports."""

    body: dict
    kind: str
    image_bytes: int = 0


def _parse_spec(spec: str) -> tuple[list[str], dict[str, str]]:
    kinds, _, options = spec.partition(":")
    names = kinds.split("+")
    if names == ["mixed"]:
        names = list(IMAGE_KINDS)
    parsed = dict(item.split("=", 1) for item in options.split(",") if item) if options else {}
    if "schema" in parsed and parsed["schema"] not in SCHEMAS:
        raise ValueError(f"unknown schema {parsed['schema']!r}; use {sorted(SCHEMAS)}")
    for name in names:
        if name not in (*IMAGE_KINDS, "text"):
            raise ValueError(
                f"unknown workload kind {name!r}; use {sorted(IMAGE_KINDS)}, "
                "'mixed', 'text' or 'jsonl:FILE'"
            )
    return names, parsed


def output_lengths(spec: str, count: int, seed: int) -> list[int]:
    """``64`` for a fixed length, ``32-128`` for a uniform range."""
    low, _, high = spec.partition("-")
    rng = random.Random(seed)
    return [rng.randint(int(low), int(high or low)) for _ in range(count)]


def build_requests(
    workload: str,
    model: str,
    num_requests: int,
    output_tokens: str = "64",
    ignore_eos: bool = True,
    seed: int = 0,
) -> list[RequestSpec]:
    """``num_requests`` request bodies for ``workload``, images encoded up front."""
    if workload.startswith("jsonl:"):
        return _from_jsonl(Path(workload.removeprefix("jsonl:")), model, num_requests, ignore_eos)
    names, options = _parse_spec(workload)
    images_per_request = int(options.get("images", 1))
    lengths = output_lengths(output_tokens, num_requests, seed)
    rng = random.Random(seed)

    def image_part(index: int, image_index: int) -> tuple[dict, int, str]:
        kind = names[index % len(names)]
        if kind == "text":
            return {}, 0, kind
        size, fmt = IMAGE_KINDS[kind]
        if "size" in options:
            size = tuple(int(v) for v in options["size"].split("x"))  # type: ignore[assignment]
        fmt = options.get("format", fmt)
        data = encode_image(
            draw_image(kind, size, seed * 1_000_003 + index * 16 + image_index), fmt
        )
        url = f"data:{_MIME[fmt]};base64," + base64.b64encode(data).decode()
        return {"type": "image_url", "image_url": {"url": url}}, len(data), kind

    jobs = [(i, j) for i in range(num_requests) for j in range(images_per_request)]
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while encoding
        parts = list(pool.map(lambda job: image_part(*job), jobs))
    specs = []
    for i in range(num_requests):
        mine = parts[i * images_per_request : (i + 1) * images_per_request]
        content = [p for p, _, _ in mine if p] + [{"type": "text", "text": rng.choice(QUESTIONS)}]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": lengths[i],
        }
        if "schema" in options:
            body["response_format"] = response_format(options["schema"])
        elif ignore_eos:
            body["ignore_eos"] = True
        specs.append(RequestSpec(body, mine[0][2], sum(n for _, n, _ in mine)))
    return specs


def _from_jsonl(path: Path, model: str, num_requests: int, ignore_eos: bool) -> list[RequestSpec]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no requests")
    specs = []
    for i in range(num_requests):
        row = dict(rows[i % len(rows)])
        row.pop("timestamp_s", None)
        body = {"model": model, "max_tokens": 64, **row}
        if ignore_eos:
            body.setdefault("ignore_eos", True)
        specs.append(RequestSpec(body, "jsonl"))
    return specs
