"""Text for calibration, evaluation and recovery, read through one module.

- `sources`: where text comes from: the data folder (`--data-dir` / `NNXPRUNE_DATA_DIR`) with
  WikiText-2 raw test and a C4 validation slice, the Hugging Face hub, local document files.
- `calibration`: the Wanda / SparseGPT reference calibration sampler, draw for draw.
- `stream`: an evaluation split as one token stream, cut into perplexity windows.
- `training`: documents packed into training / held-out windows and a resumable grain iterator.
- `grain_sources`, `grain_stream`: training documents read lazily from files and streamed through
  grain, tokenized and packed on the way, each process reading its rows, resumable
  (`[recovery.stream]`).
- `domains`: named data domains (files, the C4 slice filtered by URL, hub datasets), each packed
  into its own windows, for continued pretraining with dynamic batch loading.
- `tokens`: tokenizing to int32 ids.

Example:
    >>> from nnxprune import data
    >>> cs = data.calibration_samples(tokenizer, dataset="c4", nsamples=128, seqlen=2048)
    >>> stream = data.token_stream(protocol, tokenizer, data.resolve_data_dir(None))
    >>> windows = data.load_windows(tokenizer, "c4", seqlen=512, train_windows=64,
    ...                             heldout_windows=4)
"""

from nnxprune.data.calibration import CalibrationSet, calibration_samples
from nnxprune.data.grain_sources import check as check_stream
from nnxprune.data.grain_stream import StreamConfig, TrainStream, open_stream
from nnxprune.data.sources import (DATA_DIR_ENV, DATA_FILES, DATASETS, FILE_SUFFIXES,
                                   check_available, check_source, load_rows, resolve_data_dir)
from nnxprune.data.stream import token_stream, windows
from nnxprune.data.training import TokenWindows, heldout_batches, load_windows, train_iterator

__all__ = ["CalibrationSet", "DATASETS", "DATA_DIR_ENV", "DATA_FILES", "FILE_SUFFIXES",
           "StreamConfig", "TokenWindows", "TrainStream", "calibration_samples",
           "check_available", "check_source", "check_stream", "open_stream",
           "heldout_batches", "load_rows", "load_windows", "resolve_data_dir", "token_stream",
           "train_iterator", "windows"]
