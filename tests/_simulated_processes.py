"""Processes simulated by threads, for code that reduces across processes (`accelerator.reduce`): each thread is a
rank, and a shared board sums their tensors the way a gloo all-reduce does."""

from __future__ import annotations

import threading

import torch


class _Board:
    """What a gloo all-reduce does, for threads standing in for processes."""

    def __init__(self, world):
        self.values, self.barrier = [None] * world, threading.Barrier(world)


class _FakeAccelerator:
    device = torch.device("cpu")

    def __init__(self, rank, world, board):
        self.process_index, self.num_processes, self.board = rank, world, board

    def reduce(self, tensor, reduction="sum"):
        self.board.values[self.process_index] = tensor.clone()
        self.board.barrier.wait()
        total = sum(self.board.values)
        self.board.barrier.wait()
        return total
