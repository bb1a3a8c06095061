"""Batched prediction: N images per graph run (``predict.py --batch-size N``, evaluation
during training with TRAIN.IMAGES_PER_DEVICE = N).

A model built for N images (``build_model(images=N)``) takes ``image`` float32
[N, H, W, C] (resized images zero-padded to the largest) and ``image_sizes`` int32 [N, 2],
and names image i's outputs ``image{i}/output/boxes`` etc. (NOTES.md, "Several images per
device"). `BatchModel` hides that: it maps a list of up to N resized images to one list of
outputs per image, exactly what the single-image graph returns for each alone.
"""
import numpy as np

__all__ = ['batch_output_names', 'BatchModel']

# The side of the blank image that fills a short last batch: cheap, and not smaller than
# the largest feature stride (64).
_FILLER_SIDE = 64


def batch_output_names(names, batch_size):
    """Per-image output names, image-major: image0/<names...>, image1/<names...>, ..."""
    return ['image{}/{}'.format(i, n) for i in range(batch_size) for n in names]


class BatchModel:
    """A callable over a list of resized images for a predictor of the N-image graph.

    Args:
        predictor: callable(image [N, H, W, C], image_sizes [N, 2]) -> list of arrays, the
            outputs ``batch_output_names(names, N)`` (e.g. a tensorpack OfflinePredictor).
        batch_size (int): N; num_outputs (int): len(names).
    """

    def __init__(self, predictor, batch_size, num_outputs):
        self.predictor = predictor
        self.batch_size = batch_size
        self.num_outputs = num_outputs

    def __call__(self, images):
        """list of 1..N float32 [h_i, w_i, C] -> list (per image) of lists of outputs."""
        count = len(images)
        assert 0 < count <= self.batch_size, (count, self.batch_size)
        channels = images[0].shape[2]
        filler = np.zeros((_FILLER_SIDE, _FILLER_SIDE, channels), np.float32)
        images = list(images) + [filler] * (self.batch_size - count)
        sizes = np.array([img.shape[:2] for img in images], np.int32)
        batch = np.zeros((len(images),) + tuple(sizes.max(axis=0)) + (channels,), np.float32)
        for i, img in enumerate(images):
            batch[i, :img.shape[0], :img.shape[1]] = img
        outputs = self.predictor(batch, sizes)
        k = self.num_outputs
        return [list(outputs[i * k:(i + 1) * k]) for i in range(count)]
