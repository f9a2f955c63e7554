"""Offline purification of image corpora (`advpure purify`): WebDataset shards of arbitrary
images in, purified shards with the same names, keys and fields out (docs/corpus.md).

reader  : stream a shard's tar members into samples, every raw field kept; validate the archive
images  : decode any mode / bit depth to float [0, 1], the size policy, encode back, PSNR / SSIM
engine  : the purifier (and optional classifier) on batches of equal shapes, keyed noise
worker  : CorpusWorker, decode → batch → purify → encode → write, then the commit
job     : the config, the driver stage `purify_corpus`, the output indexes and the manifest

This package's own import is torch-free, as `job` is (the driver's process imports it).
"""

STAGE = "purify_corpus"   # the corpus job's one stage (its stage_table entry has no evaluation function)
EXAMPLE_KEYS = 5          # dropped samples a commit marker names per reason (all are in the records)
