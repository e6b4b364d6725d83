"""Output-versus-output agreement (pure numpy): how closely a candidate's answer matches a reference answer.

Two levels, both streaming (accumulators keep counts only, so memory does not grow with the number of images):

Tensor level (`TensorStats`), for float outputs such as heatmap and mask logits:
* max absolute error, max relative error |c - r| / |r| (over elements with r != 0), cosine similarity of the
  flattened tensors (accumulated over all images, and the lowest per image);
* Polygraphy's elementwise check: an element fails only if |c - r| > atol AND |c - r| > rtol * |r|; NaN in
  either tensor fails; equal infinities pass.

Decision level (`DecisionStats`), for panoptic answers (`types.PanopticOutput`):
* top-N proposals: the reference's and the candidate's sets of (center y, center x, class) among proposals
  whose score passes the merge threshold, compared as sets (ties may reorder proposals of equal score: a
  set ignores the order), plus the share of ranks that hold the very same proposal;
* category agreement: % of pixels with the same class (VOID counts as a class);
* segment agreement: segments of the two maps are matched as PQ matches them (same class, IoU > 0.5, which
  makes the match unique), because the same segment can carry another id when proposals change slots;
  a pixel agrees when both maps call it VOID or its two segments are matched; the matched segments' IoU.
Agreements are percentages (0-100), like PQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maskconver_deploy.types import LABEL_DIVISOR, VOID_ID, PanopticOutput

__all__ = [
    "TensorStats",
    "DecisionStats",
    "elementwise_failures",
    "compare_tensors",
    "proposal_keys",
    "align_proposals",
    "match_segments",
    "image_agreement",
]

PAIR_OFFSET = 1 << 24  # larger than any panoptic id of the toolkit's encoding


# ---------------------------------------------------------------------------------------------------------------
# Tensor level
# ---------------------------------------------------------------------------------------------------------------
def elementwise_failures(candidate: np.ndarray, reference: np.ndarray, atol: float, rtol: float,
                         scale_atol: bool = False) -> np.ndarray:  # fmt: skip
    """bool mask of the elements that fail Polygraphy's check (both tolerances exceeded, or NaN).

    `scale_atol` multiplies atol by max(1, max |reference|): float32 kernels that sum in another order err in
    proportion to the magnitude of the tensor, so an element near 0 in a tensor of large values is judged on
    the tensor's scale, not its own."""
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cand.shape != ref.shape:
        raise ValueError(f"shapes differ: candidate {cand.shape}, reference {ref.shape}")
    if scale_atol:
        finite = np.abs(ref[np.isfinite(ref)])
        atol = atol * max(1.0, float(finite.max()) if finite.size else 1.0)
    with np.errstate(invalid="ignore"):
        diff = np.abs(cand - ref)
        same_inf = np.isinf(cand) & np.isinf(ref) & (np.sign(cand) == np.sign(ref))
        diff = np.where(same_inf, 0.0, diff)
        failed = (diff > atol) & (diff > rtol * np.abs(ref))
    return failed | np.isnan(cand) | np.isnan(ref) | (np.isnan(diff) & ~same_inf)


@dataclass
class TensorStats:
    """Errors of one float output accumulated over images."""

    atol: float = 1e-4
    rtol: float = 1e-4
    elements: int = 0
    failures: int = 0
    nan: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    dot: float = 0.0
    norm_candidate: float = 0.0
    norm_reference: float = 0.0
    min_cosine: float = 1.0
    images: int = 0

    def add(self, candidate: np.ndarray, reference: np.ndarray) -> float:
        """Add one image's tensors; returns that image's cosine similarity."""
        cand = np.asarray(candidate, dtype=np.float64)
        ref = np.asarray(reference, dtype=np.float64)
        failed = elementwise_failures(cand, ref, self.atol, self.rtol)
        self.elements += int(cand.size)
        self.failures += int(failed.sum())
        self.nan += int(np.isnan(cand).sum() + np.isnan(ref).sum())
        finite = np.isfinite(cand) & np.isfinite(ref)
        c, r = cand[finite], ref[finite]
        if c.size:
            diff = np.abs(c - r)
            self.max_abs = max(self.max_abs, float(diff.max()))
            nonzero = r != 0
            if nonzero.any():
                self.max_rel = max(self.max_rel, float((diff[nonzero] / np.abs(r[nonzero])).max()))
        dot, nc, nr = float(np.dot(c, r)), float(np.dot(c, c)), float(np.dot(r, r))
        self.dot += dot
        self.norm_candidate += nc
        self.norm_reference += nr
        cosine = _cosine(dot, nc, nr)
        self.min_cosine = min(self.min_cosine, cosine)
        self.images += 1
        return cosine

    @property
    def cosine(self) -> float:
        return _cosine(self.dot, self.norm_candidate, self.norm_reference)

    def result(self) -> dict[str, Any]:
        return {
            "max_abs_err": self.max_abs,
            "max_rel_err": self.max_rel,
            "cosine": self.cosine,
            "min_image_cosine": self.min_cosine if self.images else None,
            "elements": self.elements,
            "failed_elements": self.failures,
            "failed_fraction": self.failures / self.elements if self.elements else 0.0,
            "nan": self.nan,
            "atol": self.atol,
            "rtol": self.rtol,
            "within_tolerance": self.failures == 0,
        }


def _cosine(dot: float, norm_a: float, norm_b: float) -> float:
    """Cosine similarity from sums; two all-zero tensors are identical (1.0), one all-zero tensor is 0.0."""
    if norm_a == 0.0 and norm_b == 0.0:
        return 1.0
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return float(dot / np.sqrt(norm_a * norm_b))


def compare_tensors(candidate: np.ndarray, reference: np.ndarray, atol: float = 1e-4,
                    rtol: float = 1e-4) -> dict[str, Any]:  # fmt: skip
    """All tensor-level numbers for one pair of tensors."""
    stats = TensorStats(atol=atol, rtol=rtol)
    stats.add(candidate, reference)
    return stats.result()


# ---------------------------------------------------------------------------------------------------------------
# Proposals
# ---------------------------------------------------------------------------------------------------------------
Key = tuple[int, int, int]  # (center y, center x, class) of a proposal


def proposal_keys(scores: np.ndarray, classes: np.ndarray, centers: np.ndarray, threshold: float) -> list[Key]:
    """(y, x, class) of every proposal whose score passes `threshold` (the merge's validity rule), in rank order."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1)
    centers = np.asarray(centers).reshape(-1, 2)
    return [
        (int(centers[i, 0]), int(centers[i, 1]), int(classes[i])) for i in range(scores.size) if scores[i] > threshold
    ]


def align_proposals(reference_keys: list[Key], candidate_keys: list[Key]) -> tuple[list[int], list[int]]:
    """Ranks of the proposals both sides hold: (reference ranks, candidate ranks), pairwise the same proposal."""
    where = {}
    for rank, key in enumerate(candidate_keys):
        where.setdefault(key, rank)
    ref_ranks, cand_ranks = [], []
    for rank, key in enumerate(reference_keys):
        if key in where:
            ref_ranks.append(rank)
            cand_ranks.append(where[key])
    return ref_ranks, cand_ranks


# ---------------------------------------------------------------------------------------------------------------
# Segments and pixels
# ---------------------------------------------------------------------------------------------------------------
PairCounts = tuple[dict[int, int], dict[int, int], dict[tuple[int, int], int]]


def _pair_counts(reference: np.ndarray, candidate: np.ndarray) -> PairCounts:
    """Areas of each id in both maps and the intersection of every (reference id, candidate id) pair."""
    keys = reference.astype(np.int64).ravel() * PAIR_OFFSET + candidate.astype(np.int64).ravel()
    pairs, counts = np.unique(keys, return_counts=True)
    ref_of, cand_of = np.divmod(pairs, PAIR_OFFSET)
    ref_area: dict[int, int] = {}
    cand_area: dict[int, int] = {}
    inter: dict[tuple[int, int], int] = {}
    for r, c, n in zip(ref_of.tolist(), cand_of.tolist(), counts.tolist()):
        ref_area[r] = ref_area.get(r, 0) + n
        cand_area[c] = cand_area.get(c, 0) + n
        inter[(r, c)] = n
    return ref_area, cand_area, inter


def match_segments(reference: np.ndarray, candidate: np.ndarray,
                   label_divisor: int = LABEL_DIVISOR) -> list[tuple[int, int, float]]:  # fmt: skip
    """(reference id, candidate id, IoU) of segment pairs with the same class and IoU > 0.5 (unique by IoU > 0.5).

    VOID (0) is not a segment. The class of an id is id // label_divisor (the toolkit's encoding).
    """
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"maps differ in shape: reference {reference.shape}, candidate {candidate.shape}")
    ref_area, cand_area, inter = _pair_counts(reference, candidate)
    matches = []
    for (r, c), n in inter.items():
        if r == VOID_ID or c == VOID_ID or r // label_divisor != c // label_divisor:
            continue
        iou = n / (ref_area[r] + cand_area[c] - n)
        if iou > 0.5:
            matches.append((r, c, float(iou)))
    matches.sort()
    return matches


@dataclass
class ImageAgreement:
    """Decision-level agreement of one image."""

    pixels: int
    same_segment: int
    same_category: int
    segments_reference: int
    segments_candidate: int
    matches: list[tuple[int, int, float]]
    proposals_reference: int
    proposals_candidate: int
    proposals_matched: int
    proposals_same_rank: int
    proposals_ranked: int
    score_max_abs_err: float

    @property
    def pixel_agreement(self) -> float:
        return 100.0 * self.same_segment / self.pixels if self.pixels else 100.0

    @property
    def category_agreement(self) -> float:
        return 100.0 * self.same_category / self.pixels if self.pixels else 100.0


def image_agreement(candidate: PanopticOutput, reference: PanopticOutput, threshold: float = 0.0,
                    label_divisor: int = LABEL_DIVISOR) -> ImageAgreement:  # fmt: skip
    """Compare two panoptic answers of the same image (maps of equal shape)."""
    ref_map = np.asarray(reference.panoptic)
    cand_map = np.asarray(candidate.panoptic)
    if ref_map.shape != cand_map.shape:
        raise ValueError(f"panoptic maps differ in shape: reference {ref_map.shape}, candidate {cand_map.shape}")
    matches = match_segments(ref_map, cand_map, label_divisor)
    partner = {r: c for r, c, _ in matches}
    ref_ids, inverse = np.unique(ref_map, return_inverse=True)
    partners = [VOID_ID if r == VOID_ID else partner.get(int(r), -1) for r in ref_ids.tolist()]  # -1: unmatched
    mapped_values = np.asarray(partners, dtype=np.int64)
    mapped = mapped_values[inverse.reshape(ref_map.shape)]
    same_segment = int((mapped == cand_map).sum())
    ref_cat = np.where(ref_map > 0, ref_map // label_divisor, 0)
    cand_cat = np.where(cand_map > 0, cand_map // label_divisor, 0)
    same_category = int((ref_cat == cand_cat).sum())

    ref_keys = proposal_keys(reference.scores, reference.classes, reference.centers, threshold)
    cand_keys = proposal_keys(candidate.scores, candidate.classes, candidate.centers, threshold)
    matched = len(set(ref_keys) & set(cand_keys))
    ranked = min(len(ref_keys), len(cand_keys))
    same_rank = sum(1 for a, b in zip(ref_keys, cand_keys) if a == b)
    ref_ranks, cand_ranks = align_proposals(ref_keys, cand_keys)
    ref_scores = _valid_scores(reference.scores, threshold)
    cand_scores = _valid_scores(candidate.scores, threshold)
    score_err = float(np.abs(ref_scores[ref_ranks] - cand_scores[cand_ranks]).max()) if ref_ranks else 0.0
    return ImageAgreement(
        pixels=int(ref_map.size),
        same_segment=same_segment,
        same_category=same_category,
        segments_reference=int((ref_ids != VOID_ID).sum()),
        segments_candidate=int((np.unique(cand_map) != VOID_ID).sum()),
        matches=matches,
        proposals_reference=len(ref_keys),
        proposals_candidate=len(cand_keys),
        proposals_matched=matched,
        proposals_same_rank=same_rank,
        proposals_ranked=ranked,
        score_max_abs_err=score_err,
    )


def _valid_scores(scores: np.ndarray, threshold: float) -> np.ndarray:
    """float64 scores of the proposals that pass `threshold`, in rank order (the order of `proposal_keys`)."""
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    return values[values > threshold]


@dataclass
class DecisionStats:
    """Decision-level agreement accumulated over images (counts only)."""

    threshold: float = 0.0
    label_divisor: int = LABEL_DIVISOR
    images: int = 0
    pixels: int = 0
    same_segment: int = 0
    same_category: int = 0
    segments_reference: int = 0
    segments_candidate: int = 0
    segments_matched: int = 0
    iou_sum: float = 0.0
    proposals_reference: int = 0
    proposals_candidate: int = 0
    proposals_matched: int = 0
    proposals_same_rank: int = 0
    proposals_ranked: int = 0
    score_max_abs_err: float = 0.0
    worst: dict[str, Any] = field(default_factory=dict)

    def add(self, candidate: PanopticOutput, reference: PanopticOutput, image: Any = None) -> ImageAgreement:
        """Add one image; `image` names it for the worst-image record."""
        one = image_agreement(candidate, reference, self.threshold, self.label_divisor)
        self.images += 1
        self.pixels += one.pixels
        self.same_segment += one.same_segment
        self.same_category += one.same_category
        self.segments_reference += one.segments_reference
        self.segments_candidate += one.segments_candidate
        self.segments_matched += len(one.matches)
        self.iou_sum += sum(iou for _, _, iou in one.matches)
        self.proposals_reference += one.proposals_reference
        self.proposals_candidate += one.proposals_candidate
        self.proposals_matched += one.proposals_matched
        self.proposals_same_rank += one.proposals_same_rank
        self.proposals_ranked += one.proposals_ranked
        self.score_max_abs_err = max(self.score_max_abs_err, one.score_max_abs_err)
        if not self.worst or one.pixel_agreement < self.worst["pixel_agreement"]:
            self.worst = {"image": image, "index": self.images - 1, "pixel_agreement": one.pixel_agreement}
        return one

    def result(self) -> dict[str, Any]:
        union = max(self.proposals_reference, self.proposals_candidate)
        return {
            "n_images": self.images,
            "pixels": self.pixels,
            "same_segment": self.same_segment,
            "pixel_agreement": 100.0 * self.same_segment / self.pixels if self.pixels else None,
            "category_agreement": 100.0 * self.same_category / self.pixels if self.pixels else None,
            "min_image_pixel_agreement": self.worst.get("pixel_agreement"),
            "worst_image": self.worst.get("image"),
            "worst_image_index": self.worst.get("index"),
            "segments_reference": self.segments_reference,
            "segments_candidate": self.segments_candidate,
            "segments_matched": self.segments_matched,
            "matched_segment_iou": self.iou_sum / self.segments_matched if self.segments_matched else None,
            "topn_reference": self.proposals_reference,
            "topn_candidate": self.proposals_candidate,
            "topn_matched": self.proposals_matched,
            "topn_match": 100.0 * self.proposals_matched / union if union else 100.0,
            "topn_same_rank": (100.0 * self.proposals_same_rank / self.proposals_ranked
                               if self.proposals_ranked else 100.0),  # fmt: skip
            "score_max_abs_err": self.score_max_abs_err,
            "score_threshold": self.threshold,
        }
