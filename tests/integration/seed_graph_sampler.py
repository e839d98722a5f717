"""A clean-room copy of the seed's GraphSampler (QAConv / AdaFace ``graph_sampler.py``).

Written from the seed's documented behaviour for the comparison tests only: the features come
from the training model (images through the transformer, batches of 64, no grad), distances
from ``pairwise_distance`` (a full N x N matrix filled in prob x gal blocks), the diagonal is
pushed away by 1e15, neighbours come from ``torch.topk(largest=False)``, and the sampling loop
reads each identity's list with a pointer that reshuffles on wrap. Its global-random calls
(``np.random.choice`` of the prototypes, ``random.shuffle`` of a list, ``np.random.shuffle``
of the batches) are injected so both implementations can be fed the same random choices.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


class SeedGraphSampler:
    def __init__(
        self,
        data_source,
        img_path,
        transformer,
        model,
        matcher,
        batch_size=64,
        num_instance=4,
        gal_batch_size=256,
        prob_batch_size=256,
        *,
        choose: Callable[[int], list[int]],
        reshuffle: Callable[[int, int, list[int]], list[int]],
        batch_permutation: Callable[[int, int], np.ndarray],
        shuffle_at_start: bool,
    ):
        self.data_source = data_source
        self.img_path = img_path
        self.transformer = transformer
        self.model = model
        self.matcher = matcher
        self.batch_size = batch_size
        self.num_instance = num_instance
        self.gal_batch_size = gal_batch_size
        self.prob_batch_size = prob_batch_size
        self.choose = choose  # epoch -> one dataset index per pid (np.random.choice)
        self.reshuffle = reshuffle  # (j, wrap, dataset-ordered list) -> shuffled list
        self.batch_permutation = batch_permutation  # (epoch, n) -> row order
        self.index_dic = defaultdict(list)
        for index, item in enumerate(data_source):
            self.index_dic[item[1]].append(index)
        self.pids = list(self.index_dic.keys())
        self.num_pids = len(self.pids)
        self.ordered = {pid: list(v) for pid, v in self.index_dic.items()}
        self.wraps = [0] * self.num_pids
        if shuffle_at_start:  # QAConv shuffles each list once at start; AdaFace's seed does not
            for j, pid in enumerate(self.pids):
                self.index_dic[pid] = self.reshuffle(j, 0, self.ordered[pid])
        self.sam_pointer = [0] * self.num_pids
        self.epoch = 0

    def calc_distance(self, dataset):
        self.model.eval()
        chunks = []
        with torch.no_grad():
            for i in range(0, len(dataset), 64):
                images = [
                    self.transformer(
                        Image.open(os.path.join(self.img_path, item[0])).convert("RGB")
                    )
                    for item in dataset[i : i + 64]
                ]
                out = self.model(torch.stack(images))
                chunks.append(out[0] if isinstance(out, tuple) else out)
        features = torch.cat(chunks)
        n = features.shape[0]
        score = torch.zeros(n, n)
        for i in range(0, n, self.prob_batch_size):
            j = min(i + self.prob_batch_size, n)
            for k in range(0, n, self.gal_batch_size):
                k2 = min(k + self.gal_batch_size, n)
                if hasattr(self.matcher, "make_kernel"):  # QAConv's pairwise_distance
                    self.matcher.make_kernel(features[i:j])
                    score[i:j, k:k2] = 1.0 - torch.sigmoid(self.matcher(features[k:k2]) / 10)
                else:
                    score[i:j, k:k2] = self.matcher(features[i:j], features[k:k2])
        return score

    def __iter__(self):
        sam_index = self.choose(self.epoch)
        dataset = [self.data_source[i] for i in sam_index]
        dist = self.calc_distance(dataset)
        with torch.no_grad():
            dist = dist + torch.eye(self.num_pids) * 1e15
            topk = self.batch_size // self.num_instance - 1
            _, topk_index = torch.topk(dist, topk, largest=False)
            topk_index = topk_index.numpy()
        sam_index = []
        for i in range(self.num_pids):
            id_index = topk_index[i, :].tolist()
            id_index.append(i)
            index = []
            for j in id_index:
                pid = self.pids[j]
                img_index = self.index_dic[pid]
                len_p = len(img_index)
                index_p = []
                remain = self.num_instance
                while remain > 0:
                    end = self.sam_pointer[j] + remain
                    idx = img_index[self.sam_pointer[j] : end]
                    index_p.extend(idx)
                    remain -= len(idx)
                    self.sam_pointer[j] = end
                    if end >= len_p:
                        self.wraps[j] += 1
                        img_index = self.reshuffle(j, self.wraps[j], self.ordered[pid])
                        self.index_dic[pid] = img_index
                        self.sam_pointer[j] = 0
                assert len(index_p) == self.num_instance
                index.extend(index_p)
            sam_index.extend(index)
        sam_index = np.array(sam_index).reshape((-1, self.batch_size))
        sam_index = sam_index[self.batch_permutation(self.epoch, sam_index.shape[0])]
        self.epoch += 1
        return iter(sam_index.flatten().tolist())

    def __len__(self):
        return self.num_pids
