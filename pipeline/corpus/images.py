"""Images of any size, mode and bit depth ↔ float [0, 1] arrays; the size policy; PSNR / SSIM.

Decoding (Pillow) keeps what the output needs to look like the input: the format (JPEG, PNG,
WebP), the mode (L, RGB, RGBA, LA, CMYK, 16-bit grey), ICC profile and EXIF. Colour goes to
the purifier; an alpha channel is set aside and put back unchanged (resized with the image
when the output size differs). Encoding writes the input's format: JPEG and lossy WebP at a
set quality, PNG and lossless WebP losslessly, 16-bit grey PNG as 16-bit.

What cannot be represented without silent loss is refused with a named status: a 16-bit
colour PNG (Pillow decodes it at 8 bits), a mode Pillow has no RGB conversion for.
"""
from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.schema import CorpusStatus

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FORMATS = ("JPEG", "PNG", "WEBP")
# input mode → the mode decoded to (colour channels, then alpha); None: P, decided by transparency
_DECODE_AS = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "P": None, "PA": "RGBA", "RGB": "RGB",
              "RGBX": "RGB", "RGBA": "RGBA", "RGBa": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """A sample whose image cannot be used; `status` is the record's status."""

    def __init__(self, status: CorpusStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Decoded:
    pixels: np.ndarray              # uint8 or uint16 [H, W, C], C = 1 (grey) or 3 (colour)
    alpha: np.ndarray | None        # same dtype [H, W], or None
    format: str                     # JPEG | PNG | WEBP
    mode: str                       # the input's Pillow mode
    info: dict[str, Any] = field(default_factory=dict)   # icc_profile, exif, lossless (WebP)

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.pixels.shape[0], self.pixels.shape[1]

    def unit(self) -> np.ndarray:
        """The colour channels as float32 [H, W, C] in [0, 1]."""
        return self.pixels.astype(np.float32) / float(2**self.bits - 1)

    def output_mode(self) -> str:
        """The mode the purified image is written in: the input's where it can hold a purified
        image (a palette or 1-bit image cannot: they come back as RGB(A) / L)."""
        if self.bits == 16:
            return "I;16"
        if self.mode == "CMYK":
            return "CMYK"
        grey = self.pixels.shape[2] == 1
        if self.alpha is not None:
            return "LA" if grey else "RGBA"
        return "L" if grey else "RGB"


def pick_image(exts: list[str]) -> int:
    """Index of the one image member among a sample's member extensions."""
    found = [i for i, e in enumerate(exts) if e.lower() in IMAGE_EXTS]
    if not found:
        raise ImageError(CorpusStatus.NO_IMAGE, f"no image member (fields: {', '.join(exts) or 'none'})")
    if len(found) > 1:
        raise ImageError(CorpusStatus.MULTIPLE_IMAGES,
                         f"several image members ({', '.join(exts[i] for i in found)}): which to purify is ambiguous")
    return found[0]


def _check_png_depth(data: bytes) -> None:
    """Pillow reads 16-bit colour PNGs at 8 bits: refuse rather than lose precision silently."""
    if data[:8] == _PNG_SIGNATURE and len(data) >= 26 and data[12:16] == b"IHDR":
        depth, colour = data[24], data[25]
        if depth == 16 and colour in (2, 4, 6):
            kind = {2: "RGB", 4: "grey+alpha", 6: "RGBA"}[colour]
            raise ImageError(CorpusStatus.UNSUPPORTED,
                             f"16-bit {kind} PNG: Pillow decodes it at 8 bits, which would lose precision silently")


def _webp_lossless(data: bytes) -> bool:
    """Whether a WebP holds a lossless (VP8L) bitstream: walk the RIFF chunks."""
    pos = 12
    while pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        pos += 8 + size + (size & 1)
    return False


def decode(data: bytes, max_pixels: int) -> Decoded:
    """Bytes of a JPEG / PNG / WebP → Decoded; raises ImageError with the record's status."""
    from PIL import Image

    if not data:
        raise ImageError(CorpusStatus.DECODE_ERROR, "empty image member (0 bytes)")
    _check_png_depth(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise ImageError(CorpusStatus.UNSUPPORTED, f"{im.format} image; expected {', '.join(FORMATS)}")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:  # writing one frame back would drop the others silently
                raise ImageError(CorpusStatus.UNSUPPORTED, f"animated {im.format} ({frames} frames)")
            w, h = im.size
            if w * h > max_pixels:  # known from the header: the pixels are never decoded
                raise ImageError(CorpusStatus.TOO_LARGE, f"{w}×{h} = {w * h} pixels, over corpus.max_pixels "
                                                         f"= {max_pixels}")
            im.load()
            return _arrays(im, data)
    except ImageError:
        raise
    except Exception as err:  # Pillow raises many types for bad bytes; each is this sample's error
        if isinstance(err, Image.UnidentifiedImageError):  # its message holds a memory address
            raise ImageError(CorpusStatus.DECODE_ERROR, "UnidentifiedImageError: cannot identify image file "
                                                        "(not an image Pillow can read)") from err
        raise ImageError(CorpusStatus.DECODE_ERROR, f"{type(err).__name__}: {err}") from err


def _arrays(im: Any, data: bytes) -> Decoded:
    info = {k: im.info[k] for k in ("icc_profile", "exif") if im.info.get(k)}
    if im.format == "WEBP":
        info["lossless"] = _webp_lossless(data)
    if im.mode in _SIXTEEN or (im.mode == "I" and im.format == "PNG"):
        arr = np.asarray(im)
        return Decoded(arr.astype(np.uint16)[..., None], None, im.format, im.mode, info)
    if im.mode not in _DECODE_AS:
        raise ImageError(CorpusStatus.UNSUPPORTED, f"{im.format} image in mode {im.mode}")
    target = _DECODE_AS[im.mode] or ("RGBA" if "transparency" in im.info else "RGB")
    arr = np.asarray(im.convert(target) if im.mode != target else im)
    if arr.ndim == 2:
        arr = arr[..., None]
    if target in ("LA", "RGBA"):
        colour, alpha = np.ascontiguousarray(arr[..., :-1]), np.ascontiguousarray(arr[..., -1])
        return Decoded(colour, alpha, im.format, im.mode, info)
    return Decoded(arr, None, im.format, im.mode, info)


def encode(unit: np.ndarray, alpha: np.ndarray | None, src: Decoded, quality: int) -> tuple[bytes, str]:
    """float [H, W, C] in [0, 1] (+ alpha in the input's dtype) → bytes in the input's format
    and output mode; returns (bytes, mode written)."""
    from PIL import Image

    peak = 2**src.bits - 1
    q = np.rint(np.clip(unit, 0.0, 1.0) * peak).astype(np.uint16 if src.bits == 16 else np.uint8)
    mode = src.output_mode()
    if alpha is not None and mode in ("LA", "RGBA"):
        q = np.concatenate([q, alpha[..., None].astype(q.dtype)], axis=2)
    arr = q[..., 0] if q.shape[2] == 1 else q
    im = Image.fromarray(np.ascontiguousarray(arr))  # uint16 2-D → I;16, uint8 → L / LA / RGB / RGBA
    if mode == "CMYK":
        im = im.convert("CMYK")  # Pillow's RGB → CMYK (K = 0) inverts its CMYK → RGB exactly
    kwargs: dict[str, Any] = {k: v for k, v in src.info.items() if k in ("icc_profile", "exif")}
    if src.format == "JPEG":
        kwargs["quality"] = quality
    elif src.format == "WEBP":
        kwargs.update(lossless=bool(src.info.get("lossless")), quality=quality)
    buf = io.BytesIO()
    im.save(buf, format=src.format, **kwargs)
    return buf.getvalue(), im.mode


# ---------------------------------------------------------------------------- size policy

@dataclass(frozen=True)
class SizePolicy:
    """Explicit size handling for purifiers trained at one resolution.

    size None: the purifier sees the native size. Otherwise it sees size×size: the image
    stretched to it, or (crop) scaled so the shorter side is `size` and centre-cropped.
    restore: the purified image is mapped back to the input's size (stretch only: a crop's
    border was never purified, so it cannot be restored honestly).
    """

    size: int | None = None
    crop: bool = False
    restore: bool = False
    interpolation: str = "bicubic"

    def _resize(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(hw):
            return x
        smooth = self.interpolation != "nearest"  # antialias when shrinking, as Pillow does
        y = F.interpolate(x[None], size=hw, mode=self.interpolation, antialias=smooth,
                          **({"align_corners": False} if smooth else {}))[0]
        return y.clamp(0.0, 1.0)  # bicubic overshoots

    def to_purifier(self, x: torch.Tensor) -> torch.Tensor:
        """[C, H, W] in [0, 1] → what the purifier sees."""
        if self.size is None:
            return x
        s = self.size
        if not self.crop:
            return self._resize(x, (s, s))
        h, w = x.shape[-2:]
        scale = s / min(h, w)
        nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
        y = self._resize(x, (nh, nw))
        top, left = (nh - s) // 2, (nw - s) // 2
        return y[:, top:top + s, left:left + s]

    def to_output(self, y: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """The purified [C, h, w] → the image written (the input's size when restoring)."""
        return self._resize(y, input_hw) if self.restore else y


def alpha_for_output(alpha: np.ndarray, policy: SizePolicy, out_hw: tuple[int, int]) -> np.ndarray:
    """The input's alpha at the output's geometry (unchanged when the size is kept)."""
    if alpha.shape == tuple(out_hw):
        return alpha
    peak = float(np.iinfo(alpha.dtype).max)
    t = torch.from_numpy(alpha.astype(np.float32) / peak)[None]
    t = policy.to_purifier(t)  # the output has the purifier's geometry when it is not restored
    return np.rint(t[0].numpy() * peak).astype(alpha.dtype)


# ---------------------------------------------------------------------------- quality

@functools.lru_cache(maxsize=None)
def _skimage() -> tuple[Any, Any, Any]:
    """scikit-image's functions, imported once (its lazy loader makes each import statement
    cost about a millisecond, as much as the SSIM of a small image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from skimage.transform import downscale_local_mean

    return peak_signal_noise_ratio, structural_similarity, downscale_local_mean


def psnr_ssim(ref: np.ndarray, out: np.ndarray) -> tuple[float, float | None]:
    """PSNR (dB, data range 1; inf when identical) at full resolution, and SSIM (scikit-image,
    7×7 window, smaller for small images; None below 3 pixels a side) of float [H, W, C] arrays.

    SSIM is taken at the scale Wang et al.'s reference implementation (ssim.m) uses: images
    whose shorter side exceeds 384 px are first reduced by f = round(min side / 256) with f×f
    block means. That keeps its cost bounded (a 4000×3000 image is measured at 333×250)."""
    peak_signal_noise_ratio, structural_similarity, downscale_local_mean = _skimage()
    if ref.shape != out.shape:
        raise ValueError(f"quality figures need equal shapes, got {ref.shape} and {out.shape}")
    psnr = float("inf") if np.array_equal(ref, out) else float(peak_signal_noise_ratio(ref, out, data_range=1.0))
    f = max(1, round(min(ref.shape[0], ref.shape[1]) / 256))
    if f > 1:
        h, w = ref.shape[0] // f * f, ref.shape[1] // f * f
        ref, out = (downscale_local_mean(a[:h, :w], (f, f, 1)) for a in (ref, out))
    side = min(ref.shape[0], ref.shape[1])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return psnr, None
    ssim = structural_similarity(ref, out, data_range=1.0, channel_axis=2, win_size=win)
    return psnr, float(ssim)
