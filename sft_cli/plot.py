"""PNGs with no plotting library: the loss curve (train loss blue, eval loss orange dots) and
the base-vs-tuned comparison of `sft evaluate` (grouped bars, base grey, tuned blue).

Pixels are drawn into a byte grid and written as a PNG with zlib: enough to see whether
the loss falls, with the numbers themselves in metrics.jsonl.

    loss_curve_png([(1, 2.3), (2, 2.1)], [(2, 2.2)], Path("runs/x/loss_curve.png"))
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 360, 30
BLUE, ORANGE, GREY, WHITE = (31, 119, 180), (255, 127, 14), (170, 170, 170), (255, 255, 255)


def _png(pixels: list[bytearray]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def loss_curve_png(train: list[tuple[float, float]], evals: list[tuple[float, float]], path: Path) -> None:
    pixels = [bytearray(WHITE * WIDTH) for _ in range(HEIGHT)]

    def put(x: int, y: int, color) -> None:
        if 0 <= x < WIDTH and 0 <= y < HEIGHT:
            pixels[y][3 * x:3 * x + 3] = bytes(color)

    points = train + evals
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def to_px(x: float, y: float) -> tuple[int, int]:
            px = MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)
            py = HEIGHT - MARGIN - (y - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)
            return int(round(px)), int(round(py))

        for x in range(MARGIN, WIDTH - MARGIN):  # axes
            put(x, HEIGHT - MARGIN, GREY)
        for y in range(MARGIN, HEIGHT - MARGIN):
            put(MARGIN, y, GREY)
        previous = None
        for x, y in train:
            current = to_px(x, y)
            if previous:  # a line segment, sampled densely enough to look continuous
                steps = max(abs(current[0] - previous[0]), abs(current[1] - previous[1]), 1)
                for i in range(steps + 1):
                    put(previous[0] + (current[0] - previous[0]) * i // steps,
                        previous[1] + (current[1] - previous[1]) * i // steps, BLUE)
            put(*current, BLUE)
            previous = current
        for x, y in evals:
            cx, cy = to_px(x, y)
            for dx in range(-3, 4):
                for dy in range(-3, 4):
                    if dx * dx + dy * dy <= 9:
                        put(cx + dx, cy + dy, ORANGE)
    tmp = Path(path).with_suffix(".png.tmp")
    tmp.write_bytes(_png(pixels))
    tmp.replace(path)


COMPARED = (("loss", "eval loss"), ("token_accuracy", "token accuracy"), ("forgetting_ppl", "general-text ppl"),
            ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("mean_reply_tokens", "reply length"),
            ("stopped_on_own", "stops on its own"))


def comparison_png(models: dict, path: Path) -> None:
    """One pair of bars per metric (left to right as in COMPARED), each pair scaled to its larger value."""
    pixels = [bytearray(WHITE * WIDTH) for _ in range(HEIGHT)]
    tuned, base = models.get("tuned", {}), models.get("base", {})

    def value(model: dict, key: str) -> float:
        return float(model.get(key, model.get("generation", {}).get(key, 0.0)) or 0.0)

    slot = (WIDTH - 2 * MARGIN) // len(COMPARED)
    for i, (key, _) in enumerate(COMPARED):
        pair = [(value(base, key), GREY), (value(tuned, key), BLUE)]
        top = max(v for v, _ in pair) or 1.0
        for j, (v, color) in enumerate(pair):
            height = int((HEIGHT - 2 * MARGIN) * v / top)
            x0 = MARGIN + i * slot + 6 + j * (slot - 12) // 2
            for y in range(HEIGHT - MARGIN - height, HEIGHT - MARGIN):
                pixels[y][3 * x0:3 * (x0 + (slot - 12) // 2 - 2)] = bytes(color) * ((slot - 12) // 2 - 2)
    for x in range(MARGIN, WIDTH - MARGIN):
        pixels[HEIGHT - MARGIN][3 * x:3 * x + 3] = bytes(GREY)
    tmp = Path(path).with_suffix(".png.tmp")
    tmp.write_bytes(_png(pixels))
    tmp.replace(path)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def curves_png(curves: list[list[tuple[float, float]]], path: Path) -> None:
    """Several loss curves on shared axes, one colour each (sweep points in sweep.json order)."""
    pixels = [bytearray(WHITE * WIDTH) for _ in range(HEIGHT)]
    points = [p for curve in curves for p in curve]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
        for i, curve in enumerate(curves):
            color = bytes(PALETTE[i % len(PALETTE)])
            previous = None
            for x, y in curve:
                current = (int(MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)),
                           int(HEIGHT - MARGIN - (y - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)))
                start = previous or current
                steps = max(abs(current[0] - start[0]), abs(current[1] - start[1]), 1)
                for k in range(steps + 1):
                    px = start[0] + (current[0] - start[0]) * k // steps
                    py = start[1] + (current[1] - start[1]) * k // steps
                    if 0 <= px < WIDTH and 0 <= py < HEIGHT:
                        pixels[py][3 * px:3 * px + 3] = color
                previous = current
    tmp = Path(path).with_suffix(".png.tmp")
    tmp.write_bytes(_png(pixels))
    tmp.replace(path)
