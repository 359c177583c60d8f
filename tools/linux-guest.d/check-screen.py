#!/usr/bin/env python3
"""Checks that a screenshot of the guest's console shows the banner tools/linux-guest.d/init
draws on tty0 (fbcon over virtio-gpu, through hostmem's device):

  line 1: " HOSTMEM CONSOLE ON VIRTIO-GPU " in bright white on blue (31 cells)
  line 2: 40 cells of red background
  line 3: 20 cells of green background

fbcon draws cells of 8x16 pixels (the VGA font at 1024x768) in the VGA palette, so the red
bar must be exactly 320 pixels wide and 16 tall, the green one 160 wide right below it,
and the blue band above them must hold white glyph pixels: a picture that merely exists,
or a blank or garbled frame, fails. Prints one JSON line; exit 0 only if the banner is there.

Usage: check-screen.py FILE.png   (8-bit RGB or RGBA, as hostmem writes it)
"""

import json
import struct
import sys
import zlib


def read_png(path):
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = hdr
    if depth != 8 or ctype not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {ctype}")
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev, i = [], bytearray(stride), 0
    for _ in range(h):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pr) & 255
        rows.append(line)
        prev = line
    px = lambda x, y: tuple(rows[y][x * bpp:x * bpp + 3])
    return w, h, px


def is_red(p):
    return p[0] > 150 and p[1] < 80 and p[2] < 80


def is_green(p):
    return p[1] > 150 and p[0] < 80 and p[2] < 80


def is_blue(p):
    return p[2] > 150 and p[0] < 80 and p[1] < 80


def is_white(p):
    return min(p) > 200


def runs(w, y, px, pred):
    """Runs of pixels in row y matching pred, as (start, length)."""
    out, start = [], None
    for x in range(w + 1):
        hit = x < w and pred(px(x, y))
        if hit and start is None:
            start = x
        elif not hit and start is not None:
            out.append((start, x - start))
            start = None
    return out


def check(path):
    w, h, px = read_png(path)
    res = {"file": path, "width": w, "height": h}
    red_rows = [y for y in range(h) if any(n == 320 for _, n in runs(w, y, px, is_red))]
    res["red_rows"] = len(red_rows)
    if len(red_rows) != 16 or red_rows[-1] - red_rows[0] != 15:
        res["ok"], res["why"] = False, "no 320x16 red bar (40 red cells)"
        return res
    top = red_rows[0]
    x0 = next(s for s, n in runs(w, top, px, is_red) if n == 320)
    green_rows = [
        y for y in range(top + 16, min(h, top + 32))
        if (x0, 160) in runs(w, y, px, is_green)
    ]
    res["green_rows"] = len(green_rows)
    # The banner line above: blue background with white glyphs, 31 cells from the same column.
    band = range(max(0, top - 16), top)
    blue = sum(1 for y in band for x in range(x0, min(w, x0 + 248)) if is_blue(px(x, y)))
    white = sum(1 for y in band for x in range(x0, min(w, x0 + 248)) if is_white(px(x, y)))
    res["banner_blue_px"], res["banner_white_px"] = blue, white
    res["ok"] = len(green_rows) == 16 and blue > 248 * 16 // 2 and white > 200
    if not res["ok"]:
        res["why"] = "the green bar or the white-on-blue banner line is not where it belongs"
    return res


def write_png(path, w, h, px):
    """An 8-bit RGB PNG of px(x, y) -> (r, g, b), no filter (for the self-test)."""
    raw = b"".join(b"\0" + bytes(c for x in range(w) for c in px(x, y)) for y in range(h))
    chunk = lambda k, b: struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def self_test(dir_):
    """The checker accepts the banner as fbcon draws it and refuses near misses."""
    def screen(red_cells, glyphs=True):
        def px(x, y):
            if 16 <= y < 32 and 8 <= x < 8 + 248:
                return (255, 255, 255) if glyphs and (x + y) % 3 == 0 else (0, 0, 170)
            if 32 <= y < 48 and 8 <= x < 8 + red_cells * 8:
                return (170, 0, 0)
            if 48 <= y < 64 and 8 <= x < 8 + 160:
                return (0, 170, 0)
            return (0, 0, 0)
        return px
    cases = {"good": (screen(40), True), "short_bar": (screen(39), False),
             "no_text": (screen(40, glyphs=False), False), "blank": (lambda x, y: (0, 0, 0), False)}
    for name, (px, want) in cases.items():
        f = f"{dir_}/self-test-{name}.png"
        write_png(f, 400, 100, px)
        got = check(f)["ok"]
        if got != want:
            raise SystemExit(f"check-screen self-test: {name}: ok={got}, expected {want}")
    print("check-screen: self-test passed (1 banner accepted, 3 near misses refused)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--self-test"]:
        self_test(sys.argv[2])
        sys.exit(0)
    try:
        r = check(sys.argv[1])
    except Exception as e:  # a broken file is a failed check, said in one line
        r = {"file": sys.argv[1] if len(sys.argv) > 1 else None, "ok": False, "why": str(e)}
    print(json.dumps(r))
    sys.exit(0 if r["ok"] else 1)
