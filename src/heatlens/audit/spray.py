"""Spectral Relevance Analysis (SpRAy; Lapuschkin et al., 2019, "Unmasking Clever Hans predictors").

Per class, the explanation maps are downsampled and normalised, a k-nearest-neighbour graph is
built over them, the eigengap of its normalised Laplacian picks the number of clusters, and
spectral clustering splits the class into *strategies*: groups of images the model explains alike.
Each cluster comes with its size, mean map, representative images (closest to its centre) and
boundary images (nearly as close to another cluster), and the class gets a 2-D embedding (t-SNE)
for the picture.

Everything here takes plain arrays: maps (N,h,w) read in chunks from any array-like (a Zarr array,
a NumPy memmap, a tensor), labels (N,). ``heatlens.audit.analysis`` feeds it an ``Audit``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURE_SIDE = 32  # the longest side of a downsampled map (SpRAy used 32x32 on PASCAL VOC)
CHUNK = 1024  # maps read per chunk: bounded memory whatever N is


@dataclass(frozen=True)
class Cluster:
    """One strategy of one class.

    members: image indices (into the audit). mean_map: (gh,gw) mean normalised map (sums to 1).
    representatives: members closest to the cluster centre; boundary: members nearly as close to
    another cluster (or, for a single cluster, the farthest from its centre).
    """

    label: int
    index: int
    members: np.ndarray
    mean_map: np.ndarray
    representatives: np.ndarray
    boundary: np.ndarray

    @property
    def size(self) -> int:
        return int(len(self.members))


@dataclass
class ClassClusters:
    """SpRAy on one class: its clusters, the Laplacian spectrum behind the choice of k, an embedding.

    members: (n,) image indices; assignment: (n,) cluster index of each member. eigenvalues: the
    smallest eigenvalues of the normalised graph Laplacian. embedding: (n,2) t-SNE (NaN when skipped).
    """

    label: int
    members: np.ndarray
    assignment: np.ndarray
    clusters: list[Cluster]
    eigenvalues: np.ndarray
    embedding: np.ndarray
    note: str = ""

    @property
    def k(self) -> int:
        return len(self.clusters)


@dataclass
class SprayResult:
    """SpRAy over every class of one method's maps. features: (N,gh*gw) normalised maps (float32)."""

    method: str
    grid: tuple[int, int]
    classes: dict[int, ClassClusters]
    features: np.ndarray = field(repr=False)
    valid: np.ndarray = field(repr=False)

    def cluster_of(self) -> np.ndarray:
        """(N,) global cluster id per image ("label:index" encoded as label*1000+index), -1 if unclustered."""
        out = np.full(len(self.valid), -1, dtype=np.int64)
        for c in self.classes.values():
            out[c.members] = c.label * 1000 + c.assignment
        return out


# --- features ------------------------------------------------------------------------------------

def feature_grid(shape: Sequence[int], side: int = FEATURE_SIDE) -> tuple[int, int]:
    """(gh,gw) of a downsampled (h,w) map: the longest side at most ``side``, aspect kept."""
    h, w = int(shape[-2]), int(shape[-1])
    factor = max(1, int(np.ceil(max(h, w) / side)))
    return int(np.ceil(h / factor)), int(np.ceil(w / factor))


def downsample(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """|maps| (n,h,w) -> (n,gh,gw) by area averaging (edges padded with zeros to a whole factor)."""
    a = np.abs(np.asarray(maps, dtype=np.float32))
    n, h, w = a.shape
    fh, fw = int(np.ceil(h / grid[0])), int(np.ceil(w / grid[1]))
    padded = np.zeros((n, grid[0] * fh, grid[1] * fw), dtype=np.float32)
    padded[:, :h, :w] = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    return padded.reshape(n, grid[0], fh, grid[1], fw).mean((2, 4))


def map_features(maps: Any, *, side: int = FEATURE_SIDE, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Downsampled maps normalised to unit mass, read ``chunk`` rows at a time.

    maps: any (N,h,w) array-like supporting slicing (Zarr array, NumPy, tensor).
    Returns features (N,gh*gw) float32 (rows sum to 1), valid (N,) bool (False: the map was all
    zero or not finite, so it says nothing about *where*; its row is uniform), and (gh,gw).
    """
    shape = tuple(maps.shape)
    if len(shape) != 3:
        raise ValueError(f"maps must be (N,h,w), got shape {shape}")
    grid = feature_grid(shape, side)
    n = shape[0]
    feats = np.empty((n, grid[0] * grid[1]), dtype=np.float32)
    valid = np.empty(n, dtype=bool)
    for start in range(0, n, chunk):
        block = np.asarray(_rows(maps, start, min(n, start + chunk)))
        small = downsample(block, grid).reshape(len(block), -1)
        total = small.sum(1, keepdims=True)
        ok = (total[:, 0] > 0) & np.isfinite(total[:, 0])
        feats[start:start + len(block)] = np.where(ok[:, None], small / np.where(ok, total[:, 0], 1)[:, None],
                                                   1.0 / small.shape[1])
        valid[start:start + len(block)] = ok
    return feats, valid, grid


def _rows(maps: Any, start: int, stop: int) -> np.ndarray:
    block = maps[start:stop]
    if hasattr(block, "detach"):
        block = block.detach().cpu().float().numpy()
    return np.asarray(block, dtype=np.float32)


# --- clustering ------------------------------------------------------------------------------------

def eigengap_k(eigenvalues: np.ndarray, max_k: int) -> int:
    """The number of clusters at the largest gap between consecutive Laplacian eigenvalues (1..max_k).

    eigenvalues: ascending. A graph with k well separated groups has k eigenvalues near 0 then a jump;
    one diffuse group has a spectrum that rises fastest at first, so its largest gap is the first (k=1).
    """
    ev = np.sort(np.asarray(eigenvalues, dtype=np.float64))[: max_k + 1]
    if len(ev) < 2:
        return 1
    gaps = np.diff(ev)
    k = int(np.argmax(gaps)) + 1
    return max(1, min(k, max_k))


def spectral_clusters(features: np.ndarray, *, n_neighbors: int = 10, max_k: int = 8, seed: int = 0,
                      min_size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows of ``features`` (n,d): k-NN affinity, eigengap choice of k, spectral clustering.

    Returns (assignment (n,) ints 0..k-1, the smallest Laplacian eigenvalues). Fewer than ``min_size``
    rows are one cluster (too few to split reliably).
    """
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    n = len(features)
    if n < max(min_size, 3):
        return np.zeros(n, dtype=np.int64), np.zeros(0)
    nn = min(n_neighbors, n - 1)
    graph = kneighbors_graph(features, nn, mode="connectivity", include_self=False)
    affinity = 0.5 * (graph + graph.T)  # symmetric: i~j when either is among the other's neighbours
    lap = laplacian(affinity, normed=True)
    n_ev = min(max_k + 1, n - 1)
    if n <= 2500:
        eigenvalues = np.linalg.eigvalsh(lap.toarray())[:n_ev]
    else:
        from scipy.sparse.linalg import eigsh

        # the largest eigenvalues of 2I - L are the smallest of L, and Lanczos finds those quickly
        top = eigsh(2 * _identity(n) - lap, k=n_ev, which="LA", return_eigenvectors=False)
        eigenvalues = np.sort(2 - top)
    k = eigengap_k(eigenvalues, min(max_k, n_ev - 1))
    if k == 1:
        return np.zeros(n, dtype=np.int64), eigenvalues
    model = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="cluster_qr")
    with warnings.catch_warnings():
        # separate strategies are separate graph components: expected here, not a problem
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return model.fit_predict(affinity).astype(np.int64), eigenvalues


def _identity(n: int):
    from scipy.sparse import identity

    return identity(n, format="csr")


def cluster_class(features: np.ndarray, members: np.ndarray, label: int, grid: tuple[int, int], *,
                  n_neighbors: int = 10, max_k: int = 8, n_show: int = 8, embed: bool = True,
                  max_embed: int = 300, seed: int = 0) -> ClassClusters:
    """SpRAy on one class: features (N,d) of the whole audit, ``members`` the class's image indices."""
    x = features[members]
    assignment, eigenvalues = spectral_clusters(x, n_neighbors=n_neighbors, max_k=max_k, seed=seed)
    # relabel clusters largest first, so cluster 0 is the class's main strategy
    order = np.argsort(-np.bincount(assignment), kind="stable")
    assignment = np.argsort(order)[assignment]
    centres = np.stack([x[assignment == j].mean(0) for j in range(len(order))])
    dist = ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # (n,k)
    clusters = []
    for j in range(len(order)):
        rows = np.flatnonzero(assignment == j)
        own = dist[rows, j]
        if len(order) > 1:
            other = np.delete(dist[rows], j, axis=1).min(1)
            margin = other - own  # small: almost as close to another strategy
        else:
            margin = -own  # one strategy: the boundary is its periphery
        clusters.append(Cluster(
            label=label, index=j, members=members[rows], mean_map=centres[j].reshape(grid),
            representatives=members[rows[np.argsort(own, kind="stable")[:n_show]]],
            boundary=members[rows[np.argsort(margin, kind="stable")[:n_show]]],
        ))
    embedding = tsne_embedding(x, max_points=max_embed, seed=seed) if embed else np.full((len(x), 2), np.nan)
    return ClassClusters(label=label, members=members, assignment=assignment, clusters=clusters,
                         eigenvalues=np.asarray(eigenvalues), embedding=embedding)


def tsne_embedding(x: np.ndarray, *, max_points: int = 300, seed: int = 0) -> np.ndarray:
    """(n,2) t-SNE of rows of x; beyond ``max_points`` a seeded sample is embedded, the rest NaN.

    t-SNE costs grow faster than linearly; a few hundred points per class draw the picture.
    """
    from sklearn.manifold import TSNE

    n = len(x)
    out = np.full((n, 2), np.nan, dtype=np.float32)
    if n < 5:
        return out
    rows = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    perplexity = float(min(30, max(2, (len(rows) - 1) / 3)))
    from threadpoolctl import threadpool_limits

    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500)
    # a few hundred points: one thread is plenty, and OpenMP threads on a busy machine made it 40x slower
    with threadpool_limits(1):
        out[rows] = tsne.fit_transform(x[rows]).astype(np.float32)
    return out


def spray(maps: Any, groups: np.ndarray, *, method: str = "", n_neighbors: int = 10, max_k: int = 8,
          embed: bool = True, seed: int = 0, side: int = FEATURE_SIDE, chunk: int = CHUNK,
          features: tuple[np.ndarray, np.ndarray, tuple[int, int]] | None = None) -> SprayResult:
    """SpRAy per class.

    maps: (N,h,w) array-like (read in chunks). groups: (N,) int class per image (the label, or the
    prediction where there is none); negative values are left out. Images whose map carries no
    relevance (``valid`` False) are left out of the clustering.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != maps.shape[0]:
        raise ValueError(f"groups must be (N,) = ({maps.shape[0]},), got shape {groups.shape}")
    feats, valid, grid = features if features is not None else map_features(maps, side=side, chunk=chunk)
    classes = {}
    for label in np.unique(groups[groups >= 0]):
        members = np.flatnonzero((groups == label) & valid)
        if len(members) == 0:
            continue
        classes[int(label)] = cluster_class(feats, members, int(label), grid, n_neighbors=n_neighbors,
                                            max_k=max_k, embed=embed, seed=seed)
    return SprayResult(method=method, grid=grid, classes=classes, features=feats, valid=valid)
