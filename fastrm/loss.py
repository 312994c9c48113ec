"""``fastrm.RewardLoss``: the pairwise reward-model loss, as a torchtune-style ``nn.Module``.

Use it in a torchtune config::

    loss:
      _component_: fastrm.RewardLoss
      centering_coefficient: 0.01
      use_margin: True
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from fastrm import functional as RF
from fastrm.data.batch import PackedBatch

WEIGHTINGS = ("comparison", "group")


class RewardLoss(nn.Module):
    r"""Pairwise reward-model loss with optional margins, reward centering and cross-prompt
    contrast.

    For rewards :math:`r_c` (chosen) and :math:`r_r` (rejected) of ``B`` pairs, with
    :math:`\delta = r_c - r_r - m` (``m`` the per-pair margin when ``use_margin``, else 0):

    * ``objective="bradley_terry"``: :math:`\ell = -(1-\epsilon)\log\sigma(\delta)
      - \epsilon\log\sigma(-\delta)`; ``label_smoothing`` :math:`\epsilon = 0` is plain
      Bradley-Terry, :math:`\epsilon > 0` the conservative variant (a fraction of labels is
      assumed flipped).
    * ``objective="hinge"``: :math:`\ell = \max(0, h - \delta)` with ``hinge_margin`` :math:`h`
      (margin ranking loss).
    * ``objective="plackett_luce"`` (listwise, grouped responses with full rankings): per group
      ranked :math:`r_{(1)} \succ \dots \succ r_{(K)}`,
      :math:`\ell_g = -\frac{1}{K-1}\sum_{k<K}\big(r_{(k)} - \log\sum_{m\ge k} e^{r_{(m)}}\big)`,
      averaged over groups; the ranking comes from the group's comparisons (which must be
      complete and consistent); :math:`K = 2` is Bradley-Terry. No margins.

    The loss is the mean of :math:`\ell` over pairs plus the reward-centering term of
    arXiv 2312.09244, :math:`c \cdot \mathrm{mean}((r_c + r_r)^2)` with
    ``centering_coefficient`` :math:`c` (default 0: off).

    **Cross-prompt** (``cross_prompt=True``, Relative Preference Optimization, arXiv 2402.10958):
    every chosen response is contrasted with every rejected response of the batch, weighted by
    the similarity of their prompts,
    :math:`\mathcal{L} = \frac{1}{B_c}\sum_{i,j} W_{ij}\,\ell(r_{c,i} - r_{r,j} - m_{ij})`,
    :math:`W_{ij} = \mathrm{softmax}_j(\cos(e_i, e_j)/\tau)` from prompt embeddings
    (``temperature`` :math:`\tau`); margins apply to the labelled pairs (:math:`i = j`) only.
    ``W = I`` is same-prompt Bradley-Terry. Unpaired pools (``B_c \ne B_r``) are allowed.

    **Comparisons** (grouped responses): :meth:`comparison_loss` takes ``N`` rewards and ``P``
    index pairs; ``weighting="group"`` weights each comparison by ``1 / C_g`` (``C_g``
    comparisons in its prompt group), as InstructGPT did, so a prompt with many comparisons
    does not dominate; ``"comparison"`` (default) weights all comparisons equally.

    Shapes: ``chosen_rewards`` and ``rejected_rewards`` are ``[B]`` or ``[B, 1]``; ``margin``
    ``[B]``; the result is a scalar.

    Args:
        objective: ``"bradley_terry"``, ``"hinge"`` or ``"plackett_luce"``.
        use_margin: subtract the per-pair ``margin`` (required in every call when ``True``).
            Left unset (``None``), margins are ignored with a one-time warning when some
            arrive; an explicit ``False`` ignores them silently (a config that chose so).
        centering_coefficient: weight of the reward-centering term.
        label_smoothing: :math:`\epsilon` of the Bradley-Terry objective, in ``[0, 0.5)``.
        hinge_margin: :math:`h` of the hinge objective.
        cross_prompt: contrast across prompts (needs prompt embeddings or contrast weights).
        temperature: softmax temperature :math:`\tau` of the cross-prompt weights.
        weighting: ``"comparison"`` or ``"group"`` (see above).
        backend: fused head + loss backend for :meth:`from_hidden` (``"triton"``,
            ``"native"``, ``"torch"`` or ``None`` for automatic).
    """

    def __init__(
        self,
        objective: str = "bradley_terry",
        use_margin: Optional[bool] = None,
        centering_coefficient: float = 0.0,
        label_smoothing: float = 0.0,
        hinge_margin: float = 1.0,
        cross_prompt: bool = False,
        temperature: float = 0.1,
        weighting: str = "comparison",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        RF.check_objective(objective, listwise=True)
        if objective in RF.LISTWISE_OBJECTIVES and (use_margin or cross_prompt):
            raise ValueError(f"objective={objective!r} takes no margin and no cross-prompt "
                             "contrast; set use_margin: False and cross_prompt: False")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if centering_coefficient < 0:
            raise ValueError(f"centering_coefficient must be >= 0, got {centering_coefficient}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if label_smoothing and objective != "bradley_terry":
            raise ValueError("label_smoothing applies to objective='bradley_terry' only")
        self.objective = objective
        self.use_margin = bool(use_margin)
        self._warned_unused_margin = use_margin is not None  # explicit False: no warning
        self.centering_coefficient = float(centering_coefficient)
        self.label_smoothing = float(label_smoothing)
        self.hinge_margin = float(hinge_margin)
        self.cross_prompt = cross_prompt
        self.temperature = float(temperature)
        self.weighting = weighting
        self.backend = backend
        self._head: Optional[nn.Module] = None

    # ------------------------------------------------------------------ helpers
    @property
    def listwise(self) -> bool:
        return self.objective in RF.LISTWISE_OBJECTIVES

    def _pairwise_kwargs(self) -> dict:
        """Objective options for pairwise formulas (a listwise objective on a lone pair is
        Bradley-Terry)."""
        kw = self._objective_kwargs()
        if self.listwise:
            kw["objective"] = "bradley_terry"
        return kw

    def _objective_kwargs(self) -> dict:
        return dict(
            objective=self.objective,
            label_smoothing=self.label_smoothing,
            hinge_margin=self.hinge_margin,
            centering_coefficient=self.centering_coefficient,
        )

    def _margin(self, margin: Optional[torch.Tensor], count: int) -> Optional[torch.Tensor]:
        """Checks and returns the margin to use (``None`` when margins are off)."""
        if not self.use_margin:
            if margin is not None and not self._warned_unused_margin:
                warnings.warn("RewardLoss got per-pair margins but use_margin is not set: they "
                              "are ignored; set use_margin: true to use them (or false to say "
                              "so and silence this)", stacklevel=3)
                self._warned_unused_margin = True
            return None
        if margin is None:
            raise ValueError("RewardLoss(use_margin=True) needs a margin for every pair, got None; "
                             "pass margin= or set use_margin: False")
        margin = margin.reshape(-1)
        if margin.shape[0] != count:
            raise ValueError(f"margin has {margin.shape[0]} entries, expected one per pair ({count})")
        finite = torch.isfinite(margin)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise ValueError(f"margin of pair {bad} is {margin[bad].item()}; margins must be finite")
        return margin

    def _comparison_weight(self, group_index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.weighting == "comparison":
            return None
        if group_index is None:
            raise ValueError("weighting='group' needs group_index (one group id per comparison)")
        _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
        return 1.0 / counts[inverse].double()  # cast to the rewards dtype downstream

    @staticmethod
    def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
        if x.dim() == 2 and x.shape[1] == 1:
            return x[:, 0]
        if x.dim() != 1:
            raise ValueError(f"{name} must be [B] or [B, 1], got {tuple(x.shape)}")
        return x

    def contrast_weights(
        self, chosen_prompt_embeddings: torch.Tensor, rejected_prompt_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """``[Bc, Br]`` cross-prompt weights from prompt embeddings ``[Bc, E]`` and ``[Br, E]``."""
        return RF.prompt_similarity_weights(
            chosen_prompt_embeddings, rejected_prompt_embeddings, self.temperature
        )

    # ------------------------------------------------------------------ losses
    def forward(
        self,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        margin: Optional[torch.Tensor] = None,
        *,
        contrast_weights: Optional[torch.Tensor] = None,
        chosen_prompt_embeddings: Optional[torch.Tensor] = None,
        rejected_prompt_embeddings: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss over pairs ``(chosen_rewards[b], rejected_rewards[b])``.

        Args:
            chosen_rewards: ``[B]`` or ``[B, 1]`` (``[Bc]`` for unpaired cross-prompt pools).
            rejected_rewards: ``[B]`` or ``[B, 1]`` (``[Br]``).
            margin: ``[B]`` per-pair margins, used when ``use_margin``.
            contrast_weights: ``[Bc, Br]`` cross-prompt weights (cross_prompt only); or give
                the prompt embeddings and they are computed here.
        Returns:
            scalar loss.
        """
        r_c = self._flat(chosen_rewards, "chosen_rewards")
        r_r = self._flat(rejected_rewards, "rejected_rewards")
        if self.cross_prompt:
            w = self._resolve_contrast(contrast_weights, chosen_prompt_embeddings,
                                       rejected_prompt_embeddings)
            if r_c.shape[0] == r_r.shape[0]:
                m = self._margin(margin, r_c.shape[0])
            elif self.use_margin:
                raise ValueError("use_margin needs paired data; unpaired cross-prompt pools "
                                 f"({r_c.shape[0]} chosen, {r_r.shape[0]} rejected) take no margin")
            else:
                m = None
            return RF.contrast_loss(r_c, r_r, w, m, **self._objective_kwargs())
        if r_c.shape != r_r.shape:
            raise ValueError(f"chosen_rewards {tuple(r_c.shape)} and rejected_rewards "
                             f"{tuple(r_r.shape)} must have the same shape")
        m = self._margin(margin, r_c.shape[0])
        return RF.pair_loss(r_c, r_r, m, **self._pairwise_kwargs())

    def _resolve_contrast(self, contrast_weights, chosen_emb, rejected_emb) -> torch.Tensor:
        if contrast_weights is not None:
            return contrast_weights
        if chosen_emb is None or rejected_emb is None:
            raise ValueError("RewardLoss(cross_prompt=True) needs contrast_weights or both "
                             "chosen_prompt_embeddings and rejected_prompt_embeddings")
        return self.contrast_weights(chosen_emb, rejected_emb)

    def comparison_loss(
        self,
        rewards: torch.Tensor,
        chosen_index: torch.Tensor,
        rejected_index: torch.Tensor,
        margin: Optional[torch.Tensor] = None,
        group_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss over ``P`` comparisons among ``N`` rewards (grouped responses).

        Args:
            rewards: ``[N]`` rewards (or ``[N, 1]``).
            chosen_index, rejected_index: ``[P]`` indices into ``rewards``.
            margin: ``[P]``, used when ``use_margin``.
            group_index: ``[P]`` prompt-group id per comparison (``weighting="group"``).
        """
        rewards = self._flat(rewards, "rewards")
        if self.listwise:
            return self._listwise(rewards, chosen_index, rejected_index, group_index)
        m = self._margin(margin, chosen_index.shape[0])
        return RF.comparison_loss(rewards, chosen_index, rejected_index, m,
                                  self._comparison_weight(group_index), **self._objective_kwargs())

    def set_head(self, head: nn.Module) -> None:
        """Binds the reward head (an ``nn.Linear(D, 1)``, e.g. ``RewardModel.head``) once, as
        torchtune's chunked losses take the output projection (``set_model_output``); then
        :meth:`head_loss` needs only the hidden states and the batch.

        The module is kept, not its tensors: FSDP2 swaps a module's parameters for their
        gathered versions in the forward of the unit that owns them, and :meth:`head_loss`
        reads them at call time (call it inside that forward, as
        :class:`fastrm.training.RewardModelStep` does). The head is not registered as a child
        of the loss: it belongs to the model (its state-dict keys, its FSDP unit)."""
        self.__dict__["_head"] = head  # bypasses nn.Module.__setattr__ (no submodule)

    def head_loss(self, hidden: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`from_hidden` with the head bound by :meth:`set_head` and the batch's own
        ``prompt_embeddings`` (cross_prompt)."""
        if self._head is None:
            raise ValueError("RewardLoss.head_loss needs a head: call set_head(model.head) once, "
                             "or use from_hidden(hidden, weight, bias, batch)")
        return self.from_hidden(hidden, self._head.weight, self._head.bias, batch)

    def from_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        batch: PackedBatch,
        prompt_embeddings: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused reward head + loss straight from packed hidden states.

        Computes ``rewards = hidden[batch.reward_positions] @ weight + bias`` and the loss over
        ``batch``'s comparisons in one op (:func:`fastrm.ops.fused_reward_head_loss`), never
        materializing a ``[T, 1]`` head output.

        Args:
            hidden: ``[T, D]`` (or ``[1, T, D]``) hidden states of the packed batch.
            weight: ``[D]`` or ``[1, D]`` reward-head weight; ``bias``: ``[1]`` or ``None``.
            batch: the :class:`~fastrm.data.batch.PackedBatch` the hidden states come from.
            prompt_embeddings: ``[N, E]`` prompt embedding of each scored response
                (cross_prompt only; default ``batch.prompt_embeddings``).
        Returns:
            ``(loss, rewards)``: scalar loss and ``[N]`` detached fp32 rewards.
        """
        from fastrm.ops import fused_reward_head_loss

        if prompt_embeddings is None:
            prompt_embeddings = batch.prompt_embeddings
        if hidden.dim() == 3:
            if hidden.shape[0] != 1:
                raise ValueError(f"hidden must be [T, D] or [1, T, D], got {tuple(hidden.shape)}")
            hidden = hidden[0]
        if self.listwise:
            # listwise needs every reward of a group at once: gather the N rows (never [T, 1])
            w = weight.reshape(-1).float()
            rewards = hidden.index_select(0, batch.reward_positions).float() @ w
            if bias is not None:
                rewards = rewards + bias.float().reshape(())
            loss = self._listwise(rewards, batch.chosen_index, batch.rejected_index,
                                  batch.group_index)
            return loss, rewards.detach()
        m = self._margin(batch.margin, batch.num_comparisons)
        kwargs = self._objective_kwargs()
        if self.cross_prompt:
            if prompt_embeddings is None:
                raise ValueError("RewardLoss(cross_prompt=True).from_hidden needs prompt_embeddings "
                                 "[N, E] (one per scored response; collate with prompt_embeddings)")
            prompt_embeddings = prompt_embeddings.to(hidden.device)
            w = self.contrast_weights(prompt_embeddings[batch.chosen_index],
                                      prompt_embeddings[batch.rejected_index])
            return fused_reward_head_loss(
                hidden, weight, bias, batch.reward_positions, batch.chosen_index,
                batch.rejected_index, m, None, contrast_weights=w, backend=self.backend, **kwargs)
        return fused_reward_head_loss(
            hidden, weight, bias, batch.reward_positions, batch.chosen_index, batch.rejected_index,
            m, self._comparison_weight(batch.group_index), backend=self.backend, **kwargs)

    def _listwise(self, rewards, chosen_index, rejected_index, group_index) -> torch.Tensor:
        if group_index is None:
            raise ValueError("objective='plackett_luce' needs group_index (one group id per "
                             "comparison) to know which responses form a ranking")
        rankings = RF.rankings_from_comparisons(chosen_index, rejected_index, group_index)
        return RF.listwise_loss(rewards, rankings, self.centering_coefficient, chosen_index,
                                rejected_index)

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
        """Per-pair metrics: ``accuracy`` (``r_c > r_r``), ``margin`` (mean ``r_c - r_r``),
        ``chosen_reward``, ``rejected_reward``, ``reward_mean``, ``reward_std`` and the
        ``comparisons`` count (:class:`fastrm.training.metrics.ComparisonSums`)."""
        from fastrm.training.metrics import ComparisonSums

        r_c = RewardLoss._flat(chosen_rewards, "chosen_rewards")
        r_r = RewardLoss._flat(rejected_rewards, "rejected_rewards")
        b = r_c.shape[0]
        idx = torch.arange(b)
        return ComparisonSums.of(torch.cat([r_c, r_r]), idx, idx + b).metrics()

    @staticmethod
    def batch_metrics(rewards: torch.Tensor, batch: PackedBatch) -> dict[str, float]:
        """Per-comparison metrics (as :meth:`metrics`) for ``rewards [N]`` of a ``batch``."""
        from fastrm.training.metrics import ComparisonSums

        return ComparisonSums.of_batch(rewards, batch).metrics()

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, use_margin={self.use_margin}, "
                f"centering_coefficient={self.centering_coefficient}, "
                f"label_smoothing={self.label_smoothing}, cross_prompt={self.cross_prompt}, "
                f"weighting={self.weighting!r}")
