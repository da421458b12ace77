"""The attacks of the security evaluation, each a small class behind `core.Attack`.

Building blocks (functions) are combined into pipelines; each pipeline is one row of the table:

- `CosineMatch` (the GroupCover paper's attack): columns, then rows matched to public ones by
  cosine similarity, each row rescaled by least squares.
- `PerturbationFilter`: the same alignment, then entries far from the public weight put back
  (against a few planted perturbations, NNSplitter-style).
- `DirectionMatch` (ArrowMatch-style, USENIX Security 2025): weight-vector directions matched
  against the public ones with signatures invariant to the other axis' shuffling and scaling,
  one-to-one, refined by alternating rows and columns.
- `InvariantAttack` (ours): a column permutation from quantities that no mixing of a row block
  changes (per-group leverage = projector diagonals, `leverage`; the whole matrix's projector for
  layers with fewer rows than columns, `rowspace`; column Gram profiles, `gram`), then
  least-squares de-mixing of each group against the public rows, with integer rounding where the
  scheme's mixing is integral (`+int`). For `rowspace` the reconstruction can also be the public
  weight projected on the published row space (`+proj`), whatever the mixing; `colspace+proj`
  is the same for layers with more rows than columns, whatever a right-hand transform.
- `SparseCodingGroups` (ours): the grouping recovered without the public grouping function, by
  orthogonal matching pursuit of every published row over the public rows.
- `ActivationStats` (ours): per-feature statistics of the unmasked payloads matched to the public
  model's activations (input permutation), then the row step of the invariant attack or cosine.
- `KnownInputCorrelation`, `KnownInputRegression` (ours): the attacker chose the inputs, so it
  holds the public model's activations on the very payloads' texts: payload features matched by
  correlation (permutations), or input and output transforms fitted by least squares (dense).
"""

from __future__ import annotations

import torch

from groupcover import obfuscate
from groupcover.attacks.core import Attack, LayerView, Reconstruction

# ---- building blocks -------------------------------------------------------------------------


def assignment(cost: torch.Tensor, rounds: int = 64) -> torch.Tensor:
    """A one-to-one assignment rows -> columns of low total cost (mutual best, then greedy)."""
    n = cost.shape[0]
    result = torch.full((n,), -1, dtype=torch.long)
    free_rows = torch.arange(n)
    free_cols = torch.arange(n)
    for _ in range(rounds):
        if free_rows.numel() == 0:
            return result
        sub = cost[free_rows][:, free_cols]
        best_col = sub.argmin(dim=1)
        best_row = sub.argmin(dim=0)
        mutual = best_row[best_col] == torch.arange(free_rows.numel())
        if not bool(mutual.any()):
            break
        result[free_rows[mutual]] = free_cols[best_col[mutual]]
        keep_cols = torch.ones(free_cols.numel(), dtype=torch.bool)
        keep_cols[best_col[mutual]] = False
        free_rows, free_cols = free_rows[~mutual], free_cols[keep_cols]
    if free_rows.numel():  # the rest greedily: rows with the cheapest best pair first
        sub = cost[free_rows][:, free_cols].clone()
        order = torch.argsort(sub.min(dim=1).values).tolist()
        for r in order:
            c = int(sub[r].argmin())
            result[free_rows[r]] = free_cols[c]
            sub[:, c] = float("inf")
    return result


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of a and b."""
    return (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.t()


def cosine_cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - |cos| between rows of a and rows of b."""
    an = a / a.norm(dim=1, keepdim=True).clamp(min=1e-30)
    bn = b / b.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return 1 - (an @ bn.t()).abs()


def unpermute_columns(published: torch.Tensor, in_perm: torch.Tensor) -> torch.Tensor:
    """W' with W'[:, in_perm[c]] = W''[:, c]."""
    out = torch.empty_like(published)
    out[:, in_perm] = published
    return out


def match_rows(aligned: torch.Tensor, public: torch.Tensor) -> torch.Tensor:
    """Rows of `aligned` matched one-to-one to public rows by |cos|, rescaled by least squares,
    put at the public row's place."""
    rows = assignment(cosine_cost(aligned, public))  # published row r -> public row rows[r]
    target = public[rows]
    alpha = (aligned * target).sum(1) / (aligned * aligned).sum(1).clamp(min=1e-30)
    out = torch.empty_like(aligned)
    out[rows] = aligned * alpha.unsqueeze(1)
    return out


def public_groups(view: LayerView) -> list[list[int]]:
    """The grouping the scheme would compute, re-run on the public weight (cached per view)."""
    if "groups" not in view.cache:
        view.cache["groups"] = obfuscate.group_rows(view.public, view.k)
    groups: list[list[int]] = view.cache["groups"]
    return groups


def _stack(weight: torch.Tensor, groups: list[list[int]], size: int) -> tuple[torch.Tensor, list]:
    chosen = [g for g in groups if len(g) == size]
    index = torch.tensor(chosen, dtype=torch.long).view(-1, size)
    return weight[index], chosen


def group_leverage(weight: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """(G, in): diag of the projector on each group's row space, per column (mixing-invariant)."""
    feats = []
    for size in sorted({len(g) for g in groups}):
        block, _ = _stack(weight, groups, size)  # (G, k, in)
        gram = block @ block.transpose(1, 2)
        inv = torch.linalg.pinv(gram)
        feats.append(torch.einsum("gri,grs,gsi->gi", block, inv, block))
    return torch.cat(feats)


def leverage_perm(view: LayerView) -> torch.Tensor:
    if "leverage" not in view.cache:
        groups = public_groups(view)
        published = group_leverage(view.published, groups).t()  # (in, G)
        public = group_leverage(view.public, groups).t()
        view.cache["leverage"] = assignment(distance(published, public))
    perm: torch.Tensor = view.cache["leverage"]
    return perm


def profile(matrix: torch.Tensor) -> torch.Tensor:
    """Each row's sorted absolute values: invariant to any permutation of the other index."""
    return matrix.abs().sort(dim=1, descending=True).values


def rowspace_perm(view: LayerView) -> torch.Tensor | None:
    """Columns matched by their rows of the projector on the row space (out < in only)."""
    out, inn = view.published.shape
    if out >= inn:
        return None

    def projector(w: torch.Tensor) -> torch.Tensor:
        q = torch.linalg.qr(w.t()).Q  # (in, out) orthonormal basis of the row space
        return q @ q.t()

    p_pub, p_pubd = projector(view.published), projector(view.public)
    feats = torch.cat([p_pub.diagonal().unsqueeze(1) * 4, profile(p_pub)[:, :64]], dim=1)
    featp = torch.cat([p_pubd.diagonal().unsqueeze(1) * 4, profile(p_pubd)[:, :64]], dim=1)
    first = assignment(distance(feats, featp))
    # refine: with a first guess the full projector rows can be compared entry by entry
    for _ in range(1):  # published P[c, d] ~ public P[first[c], first[d]]
        first = assignment(distance(p_pub, p_pubd[:, first]))
    return first


def gram_perm(view: LayerView) -> torch.Tensor:
    def feats(w: torch.Tensor) -> torch.Tensor:
        g = w.t() @ w
        d = g.diagonal().clamp(min=1e-30).sqrt()
        corr = g / d.unsqueeze(0) / d.unsqueeze(1)
        return torch.cat([d.unsqueeze(1) / d.mean(), profile(corr)[:, 1:65]], dim=1)

    return assignment(distance(feats(view.published), feats(view.public)))


def demix_groups(
    aligned: torch.Tensor,
    public: torch.Tensor,
    groups: list[list[int]],
    integral: bool,
    tolerance: float = 0.2,
) -> torch.Tensor:
    """Per group: A = argmin ||A W_pub,g - W'_g|| (rounded if integral), W_rec,g = A^-1 W'_g.

    A group whose fit is poor (wrong grouping or wrong columns) keeps the public rows.
    """
    return demix_groups_mask(aligned, public, groups, integral, tolerance)[0]


def demix_groups_mask(
    aligned: torch.Tensor,
    public: torch.Tensor,
    groups: list[list[int]],
    integral: bool,
    tolerance: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`demix_groups` and the rows it de-mixed (True) rather than kept public."""
    rec = public.clone()
    done = torch.zeros(public.shape[0], dtype=torch.bool)
    for size in sorted({len(g) for g in groups}):
        mixed, chosen = _stack(aligned, groups, size)
        base, _ = _stack(public, groups, size)
        gram = base @ base.transpose(1, 2)
        fit = mixed @ base.transpose(1, 2) @ torch.linalg.pinv(gram)  # (G, k, k)
        if integral:
            rounded = fit.round()
            close = (fit - rounded).abs().amax(dim=(1, 2)) < 0.35
            fit = torch.where(close.view(-1, 1, 1), rounded, fit)
        residual = (fit @ base - mixed).flatten(1).norm(dim=1) / mixed.flatten(1).norm(dim=1)
        ok = (residual < tolerance) & (torch.linalg.matrix_rank(fit) == size)
        restored = torch.linalg.lstsq(fit[ok], mixed[ok]).solution
        index = torch.tensor(chosen, dtype=torch.long).view(-1, size)[ok]
        rec[index.flatten()] = restored.reshape(-1, rec.shape[1])
        done[index.flatten()] = True
    return rec, done


def demix_refined(
    view: LayerView,
    cols: torch.Tensor,
    groups: list[list[int]],
    integral: bool,
    rounds: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """De-mix, then re-match every de-mixed column to the public columns and de-mix again.

    De-mixing acts on rows, so it commutes with the column order: the de-mixed published
    columns are the victim's columns, which match the public ones far better than any mixed
    quantity does (a few wrong columns of the first match are put right).
    """
    aligned = unpermute_columns(view.published, cols)
    rec, done = demix_groups_mask(aligned, view.public, groups, integral)
    for _ in range(rounds):
        if int(done.sum()) < 8:
            break
        restored = rec[done][:, cols]  # published column c, de-mixed (de-mixed rows only)
        better = assignment(distance(restored.t(), view.public[done].t()))
        if torch.equal(better, cols):
            break
        cols = better
        aligned = unpermute_columns(view.published, cols)
        rec, done = demix_groups_mask(aligned, view.public, groups, integral)
    return rec, cols


def omp_supports(rows: torch.Tensor, atoms: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) sorted indices of the k atoms OMP picks for every row."""
    norms = atoms.norm(dim=1).clamp(min=1e-30)
    unit = atoms / norms.unsqueeze(1)
    residual = rows.clone()
    support = torch.empty(rows.shape[0], 0, dtype=torch.long)
    for _ in range(k):
        corr = (residual @ unit.t()).abs()
        if support.numel():
            corr.scatter_(1, support, -1.0)
        support = torch.cat([support, corr.argmax(dim=1, keepdim=True)], dim=1)
        chosen = atoms[support]  # (rows, t, in)
        coef = torch.linalg.lstsq(chosen.transpose(1, 2), rows.unsqueeze(2)).solution
        residual = rows - (chosen.transpose(1, 2) @ coef).squeeze(2)
    return support.sort(dim=1).values


def activation_features(x: torch.Tensor) -> torch.Tensor:
    """(features, stats): moments and quantiles of every feature over the tokens."""
    x = x.to(torch.float64)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-12)
    z = (x - mean) / std
    qs = torch.quantile(x[: min(len(x), 20000)], torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95],
                        dtype=torch.float64), dim=0)  # fmt: skip
    stats = torch.stack([mean, std, (z**3).mean(0), (z**4).mean(0).log()], dim=1)
    return torch.cat([stats, qs.t()], dim=1)


def stats_perm(payloads: torch.Tensor, public_inputs: torch.Tensor) -> torch.Tensor:
    a, b = activation_features(payloads), activation_features(public_inputs)
    both = torch.cat([a, b])
    mu, sd = both.mean(0), both.std(0).clamp(min=1e-12)
    return assignment(distance((a - mu) / sd, (b - mu) / sd))


# ---- attacks ---------------------------------------------------------------------------------


class CosineMatch(Attack):
    name = "cosine"
    description = "the paper's attack: columns, then rows, matched by cosine; rows rescaled"

    def run(self, view: LayerView) -> Reconstruction | None:
        cols = assignment(cosine_cost(view.published.t(), view.public.t()))
        aligned = unpermute_columns(view.published, cols)
        return Reconstruction(match_rows(aligned, view.public), cols)


class PerturbationFilter(Attack):
    """Rows and columns aligned by cosine, then weights far from the public ones put back.

    A fine-tune moves every weight a little; a few large moves are a planted perturbation
    (NNSplitter-style): entries that moved by more than 8 robust standard deviations of the
    move get the public value.
    """

    name = "cosine+filter"
    description = "cosine alignment, then outlying entries replaced by the public ones"

    def run(self, view: LayerView) -> Reconstruction | None:
        cols = assignment(cosine_cost(view.published.t(), view.public.t()))
        aligned = match_rows(unpermute_columns(view.published, cols), view.public)
        candidates = [
            (self.filtered(view.published, view.public), torch.arange(view.published.shape[1])),
            (self.filtered(aligned, view.public), cols),
        ]  # as published, and aligned: the attacker keeps the one nearer the public weight
        weight, perm = min(candidates, key=lambda c: float((c[0] - view.public).norm()))
        return Reconstruction(weight, perm)

    @staticmethod
    def filtered(weight: torch.Tensor, public: torch.Tensor) -> torch.Tensor:
        move = weight - public
        scale = 1.4826 * float(move.abs().median()) + 1e-12
        return torch.where(move.abs() > 8 * scale, public, weight)


class DirectionMatch(Attack):
    name = "arrowmatch"
    description = "ArrowMatch-style direction matching, shuffle/scale-invariant, alternating"

    def run(self, view: LayerView) -> Reconstruction | None:
        def signature(w: torch.Tensor) -> torch.Tensor:
            unit_rows = w / w.norm(dim=1, keepdim=True).clamp(min=1e-30)
            return profile(unit_rows.t())  # per column: sorted |entries| of unit rows

        cols = assignment(cosine_cost(signature(view.published), signature(view.public)))
        rec = match_rows(unpermute_columns(view.published, cols), view.public)
        for _ in range(2):  # columns again, now against row-aligned, rescaled weights
            rows_aligned = rec[:, cols]  # published column c's values in public row order
            cols = assignment(cosine_cost(rows_aligned.t(), view.public.t()))
            rec = match_rows(unpermute_columns(view.published, cols), view.public)
        return Reconstruction(rec, cols)


class InvariantAttack(Attack):
    """A column permutation from an invariant, then the row step."""

    uses_payloads = False

    def __init__(self, columns: str, rows: str) -> None:
        self.columns, self.rows = columns, rows
        self.name = f"{columns}+{rows}"
        self.description = f"column permutation by {columns}, rows by {rows}"

    def permutation(self, view: LayerView) -> torch.Tensor | None:
        if self.columns == "leverage":
            return leverage_perm(view)
        if self.columns == "rowspace":
            return rowspace_perm(view)
        if self.columns == "gram":
            return gram_perm(view)
        raise ValueError(self.columns)

    def run(self, view: LayerView) -> Reconstruction | None:
        cols = self.permutation(view)
        if cols is None:
            return None
        if self.rows in ("ls", "ls+int"):
            integral = self.rows == "ls+int"
            rec, cols = demix_refined(view, cols, public_groups(view), integral)
            return Reconstruction(rec, cols)
        aligned = unpermute_columns(view.published, cols)
        return Reconstruction(row_step(self.rows, aligned, view), cols)


def row_step(how: str, aligned: torch.Tensor, view: LayerView) -> torch.Tensor:
    if how == "ls":
        return demix_groups(aligned, view.public, public_groups(view), integral=False)
    if how == "ls+int":
        return demix_groups(aligned, view.public, public_groups(view), integral=True)
    if how == "proj":  # the public weight projected on the published row space
        q = torch.linalg.qr(aligned.t()).Q
        return view.public @ q @ q.t()
    if how == "cosine":
        return match_rows(aligned, view.public)
    raise ValueError(how)


class ColumnSpaceProjection(Attack):
    """Layers with more rows than columns: any right transform keeps the column space.

    The output rows are aligned by the projector on the column space (as `rowspace` aligns
    columns), then the public weight is projected on the published column space.
    """

    name = "colspace+proj"
    description = "rows aligned by the column-space projector, public weight projected on it"

    def run(self, view: LayerView) -> Reconstruction | None:
        out, inn = view.published.shape
        if out <= inn:
            return None
        flipped = LayerView(view.name, view.public.t(), view.published.t(), view.k, view.scheme)
        rows = rowspace_perm(flipped)
        if rows is None:
            return None
        aligned = unpermute_columns(view.published.t(), rows).t()  # published row r -> rows[r]
        q = torch.linalg.qr(aligned).Q  # (out, in): the column space
        return Reconstruction(q @ (q.t() @ view.public), None)


def vote_groups(supports: list[list[int]], k: int) -> list[list[int]]:
    """Groups from every row's sparse support: a support of k rows is a group when a majority of
    its own rows report it (a few wrong supports do not break it); rows claimed twice go to the
    better-supported group."""
    votes: dict[tuple[int, ...], int] = {}
    for row, members in enumerate(supports):
        key = tuple(members)
        if len(key) == k and row in key:
            votes[key] = votes.get(key, 0) + 1
    taken: set[int] = set()
    groups = []
    for key, count in sorted(votes.items(), key=lambda item: -item[1]):
        if count > k // 2 and not taken & set(key):
            groups.append(list(key))
            taken |= set(key)
    return groups


class SparseCodingGroups(Attack):
    """Columns by leverage (public grouping) or by cosine (positive mixing keeps a column
    correlated with its plaintext), groups by OMP, then de-mixing."""

    def __init__(self, columns: str = "leverage") -> None:
        self.columns = columns
        self.name = f"{columns}+sparse-coding+ls+int"
        self.description = "groups recovered by OMP of published rows over public rows"

    def run(self, view: LayerView) -> Reconstruction | None:
        if self.columns == "leverage":
            cols = leverage_perm(view)
        else:
            cols = assignment(cosine_cost(view.published.t(), view.public.t()))
        aligned = unpermute_columns(view.published, cols)
        support = omp_supports(aligned, view.public, view.k)
        groups = vote_groups(support.tolist(), view.k)
        if not groups:
            return None
        rec, cols = demix_refined(view, cols, groups, integral=True)
        return Reconstruction(rec, cols)


class ActivationStats(Attack):
    uses_payloads = True

    def __init__(self, rows: str) -> None:
        self.rows = rows
        self.name = f"actstats+{rows}"
        self.description = "input permutation from payload statistics vs public activations"

    def run(self, view: LayerView) -> Reconstruction | None:
        if view.payloads is None or view.public_inputs is None:
            return None
        if "stats" not in view.cache:
            view.cache["stats"] = stats_perm(view.payloads, view.public_inputs)
        cols = view.cache["stats"]
        if self.rows in ("ls", "ls+int"):
            integral = self.rows == "ls+int"
            rec, cols = demix_refined(view, cols, public_groups(view), integral)
            return Reconstruction(rec, cols)
        aligned = unpermute_columns(view.published, cols)
        return Reconstruction(row_step(self.rows, aligned, view), cols)


class KnownInputCorrelation(Attack):
    """Chosen inputs: each payload feature matched to the public feature it correlates with."""

    name = "known-input+corr"
    description = (
        "the attacker's own texts: payload features matched by correlation, rows by cosine"
    )
    uses_payloads = True

    def run(self, view: LayerView) -> Reconstruction | None:
        x2, x = view.payloads, view.public_same_inputs
        if x2 is None or x is None or x2.shape != x.shape:
            return None
        a = (x2 - x2.mean(0)) / x2.std(0).clamp(min=1e-12)
        b = (x - x.mean(0)) / x.std(0).clamp(min=1e-12)
        cols = assignment(1 - (a.t() @ b).abs() / len(a))
        aligned = unpermute_columns(view.published, cols)
        return Reconstruction(match_rows(aligned, view.public), cols)


class KnownInputRegression(Attack):
    """Chosen inputs, dense transforms: input and output transforms by least squares."""

    name = "known-input+regression"
    description = "the attacker's own texts: input transform and output mixing by regression"
    uses_payloads = True

    def run(self, view: LayerView) -> Reconstruction | None:
        x2, x = view.payloads, view.public_same_inputs
        if x2 is None or x is None or x2.shape != x.shape or len(x) < x.shape[1]:
            return None
        # input side: x'' = x B^T (B dense, or a permutation with scales): B^T = x^+ x''
        bt = torch.linalg.lstsq(x, x2).solution  # (in, in)
        # output side: y'' = W'' x'' holds A^-1 W x; the public layer gives W_pub x
        y2, y = x2 @ view.published.t(), x @ view.public.t()
        a_inv_t = torch.linalg.lstsq(y, y2).solution  # y'' ~ y A^-T
        # W = A W'' B
        rec = torch.linalg.solve(a_inv_t.t(), view.published @ bt.t())
        return Reconstruction(rec, None)


def default_suite() -> list[Attack]:
    from groupcover.attacks.adaptive_hardened import ButterflyFit  # red team (imports schemes)

    return [
        CosineMatch(),
        PerturbationFilter(),
        DirectionMatch(),
        InvariantAttack("leverage", "ls"),
        InvariantAttack("leverage", "ls+int"),
        InvariantAttack("rowspace", "proj"),
        InvariantAttack("rowspace", "ls+int"),
        ColumnSpaceProjection(),
        InvariantAttack("gram", "ls+int"),
        InvariantAttack("gram", "cosine"),
        SparseCodingGroups("leverage"),
        SparseCodingGroups("cosine"),
        ActivationStats("ls+int"),
        ActivationStats("cosine"),
        KnownInputCorrelation(),
        KnownInputRegression(),
        ButterflyFit(),
    ]
