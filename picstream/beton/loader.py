"""`BetonLoader`: training in place on a .beton. FFCV's `Loader` reads and decodes (its JIT pipeline,
libjpeg-turbo + OpenCV crop-resize, threads); picstream decides what it visits and how it crops.

- Order: `WindowOrder`, an FFCV `TraversalOrder` whose pass `p` is this rank's share of the
  sliding-window stream for steps `[start + p·L, start + (p+1)·L)` (beton indices of the stream's IDs).
  Every pass has the same length `L` (FFCV fixes `len` from the first pass); the last one is cut short.
  FFCV 1.0.2 accepts a custom order only through `ffcv.loader.loader.ORDER_MAP` (its isinstance check
  rejects classes), so the order is registered under a private key while the Loader is built.
- Crops: `WindowCropDecoder` (one per view, all reading the image field), a RandomResizedCrop
  decoder whose randomness is a hash of `(seed, view,
  the batch's beton indices in order, slot)` instead of numba's thread-local RNG, and whose box and
  flip follow picstream's rule (`geometry.crop_box`, compiled by numba). So a batch is a function of
  `(seed, step)`: independent of FFCV's thread count, and identical after a resume.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..loader.geometry import _GOLDEN, DRAWS_PER_CROP, _mix64, crop_box
from ..loader.stream import Batch, crop_specs
from ..scheduler import batch_positions
from .dataset import BetonSet, import_ffcv


def _decoder_class():
    """`WindowCropDecoder`, built on first use (FFCV is an optional dependency)."""
    rgb = import_ffcv("ffcv.fields.rgb_image")
    compiler = import_ffcv("ffcv.pipeline.compiler").Compiler
    libffcv = import_ffcv("ffcv.libffcv")

    class WindowCropDecoder(rgb.ResizedCropRGBImageDecoder):
        def __init__(self, size: int, scale, ratio, flip: bool, seed: int, view: int):
            super().__init__((size, size))
            self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
            state = np.random.SeedSequence([seed % 2**64, view]).generate_state(1, np.uint64)
            self.key = np.uint64(state[0])

        def get_crop_generator(self):  # unused: generate_code draws the crops
            raise NotImplementedError

        def generate_code(self):
            mem_read = self.memory_read
            prange = compiler.get_iterator()
            imdecode = compiler.compile(libffcv.imdecode)
            resize_crop = compiler.compile(libffcv.resize_crop)
            box, mix = compiler.compile(crop_box), compiler.compile(_mix64)
            key, flip, draws, golden = self.key, self.flip, DRAWS_PER_CROP, _GOLDEN
            (s0, s1), (r0, r1) = self.scale, self.ratio
            jpeg = rgb.IMAGE_MODES["jpg"]

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                batch_key = key
                for index in batch_indices:
                    batch_key = mix(batch_key ^ np.uint64(index))
                for slot in prange(len(batch_indices)):
                    field = metadata[batch_indices[slot]]
                    data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpeg:
                        pixels = temp_storage[slot]
                        imdecode(data, pixels, height, width, height, width, 0, 0, 1, 1, False, False)
                        pixels = pixels.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        pixels = data.reshape(height, width, 3)
                    sample_key = mix(batch_key + np.uint64(slot + 1) * golden)
                    u = np.empty(draws)
                    for d in range(draws):
                        u[d] = (mix(sample_key + np.uint64(d + 1) * golden) >> np.uint64(11)) * (1.0 / (1 << 53))
                    top, left, h, w = box(np.int64(height), np.int64(width), u, s0, s1, r0, r1)
                    out = destination[slot]
                    resize_crop(pixels, top, top + h, left, left + w, out)
                    if flip and u[draws - 1] < 0.5:
                        out[:] = out[:, ::-1].copy()
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return WindowCropDecoder


def _order_class():
    base = import_ffcv("ffcv.traversal_order.base").TraversalOrder

    class WindowOrder(base):
        """Pass `epoch` of a BetonLoader: its beton indices, in visiting order."""

        def __init__(self, loader, plan: "BetonLoader"):
            super().__init__(loader)
            self.plan = plan

        def sample_order(self, epoch: int):
            return self.plan.pass_indices(epoch)

    return WindowOrder


class BetonLoader:
    """Same stream, split and `Batch` as `WindowLoader` (uint8 channels-last images, IDs, labels, step,
    positions, `multi_crop` views), read from a .beton by FFCV. `workers` = FFCV's decoding threads."""

    def __init__(self, beton: BetonSet, scheduler, batch_size: int, *, image_size: int = 224,
                 crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip: bool = True, multi_crop=None,
                 rank: int = 0, world_size: int = 1, workers: int | None = None, start_step: int = 0,
                 num_steps: int | None = None, seed: int = 0, pass_steps: int | None = None):
        if scheduler.num_instances != len(beton):
            raise ValueError(f"scheduler has {scheduler.num_instances} IDs, the .beton {len(beton)}")
        self.beton, self.scheduler, self.batch_size = beton, scheduler, batch_size
        self.rank, self.world_size = rank, world_size
        self.start_step, self.num_steps = start_step, num_steps
        per_epoch = math.ceil(len(beton) / (batch_size * world_size))
        self.pass_steps = pass_steps or min(per_epoch, num_steps or per_epoch)
        threads = torch.get_num_threads()
        loader_mod = import_ffcv("ffcv.loader.loader")
        transforms = import_ffcv("ffcv.transforms")
        pipeline = import_ffcv("ffcv.pipeline")
        decoder = _decoder_class()
        self.specs = crop_specs(image_size, crop_scale, crop_ratio, flip, multi_crop)
        views = [decoder(s.size, s.scale, s.ratio, s.flip, seed, v) for v, s in enumerate(self.specs)]
        pipelines = {name: None for name in beton.reader.handlers if name != beton.image_field}
        pipelines[beton.image_field] = [views[0], transforms.ToTensor()]
        for v, view in enumerate(views[1:], 1):  # one decoder per extra view, on the same field
            pipelines[f"picstream_view{v}"] = pipeline.PipelineSpec(beton.image_field, view,
                                                                    [transforms.ToTensor()])
        key = object()  # see the module docstring: the only way FFCV 1.0.2 takes a custom order
        loader_mod.ORDER_MAP[key] = functools.partial(_order_class(), plan=self)
        try:
            self.ffcv = loader_mod.Loader(beton.path, batch_size, num_workers=workers or 1, order=key,
                                          pipelines=pipelines, drop_last=True, batches_ahead=2, seed=seed)
        finally:
            del loader_mod.ORDER_MAP[key]
            torch.set_num_threads(threads)

    def pass_indices(self, p: int) -> np.ndarray:
        """This rank's beton indices for pass `p`: steps `[start + p·L, start + (p+1)·L)`."""
        first = self.start_step + p * self.pass_steps
        return np.concatenate([self.beton.beton_indices(self._ids(step))
                               for step in range(first, first + self.pass_steps)]).astype(np.uint64)

    def _ids(self, step: int) -> np.ndarray:
        positions = batch_positions(step, self.batch_size, self.rank, self.world_size)
        return self.scheduler.ids_at(int(positions[0]), int(positions[-1]) + 1)

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless BetonLoader has no length")
        return self.num_steps

    def __iter__(self):
        step, stop = self.start_step, (self.start_step + self.num_steps if self.num_steps is not None
                                       else None)
        p = 0
        while stop is None or step < stop:
            threads = torch.get_num_threads()
            self.ffcv.next_epoch = p  # the pass FFCV asks WindowOrder for
            passes = iter(self.ffcv)
            try:
                for n, views in enumerate(passes):
                    if n == 0:  # FFCV's pass thread set torch's thread count before its first batch
                        torch.set_num_threads(threads)
                    yield self._batch(step, views)
                    step += 1
                    if step == stop:
                        break
            finally:
                passes.close()
            p += 1

    def _batch(self, step: int, views) -> Batch:
        ids = self._ids(step)
        positions = batch_positions(step, self.batch_size, self.rank, self.world_size)
        labels = self.beton.labels_of_indices(self.beton.beton_indices(ids))
        # FFCV reuses its output buffers: copy, as channels-last uint8 (b, 3, H, W)
        out = [v.permute(0, 3, 1, 2).clone(memory_format=torch.channels_last) for v in views]
        return Batch(images=out[0], ids=torch.from_numpy(ids), labels=torch.from_numpy(labels), step=step,
                     positions=torch.from_numpy(positions), skipped=0, extra_crops=out[1:])

    def close(self) -> None:
        """Nothing to release beyond each pass's thread, closed when the pass ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
