"""Additive steering vectors: read them (:mod:`.read`), apply them with hooks (:mod:`.hooks`),
or fold them into biases (:mod:`.fold`) and write a standard checkpoint (:mod:`.export`)."""

from __future__ import annotations

from aufold.vectors.fold import VectorFold, fold_vectors
from aufold.vectors.hooks import add_vectors
from aufold.vectors.read import SteeringVectors, read_vectors

__all__ = ["SteeringVectors", "VectorFold", "add_vectors", "fold_vectors", "read_vectors"]
