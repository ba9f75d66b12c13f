"""When a sub-group's gradients are complete during a step's last backward.

Backward accumulates each tensor's gradient once per incoming path and graph task (tied weights,
an executor running tiles or its own backward calls can make that several times), and nothing
says which accumulation is the last. So the counts of the previous step's last backward are the
expectation: a sub-group is complete when every one of its tensors has received as many
accumulations as then (``register_post_accumulate_grad_hook`` calls ``on_grad``).

- the first step has no counts: nothing completes during backward;
- a sub-group with a tensor that got no gradient last step might get one now at an unknown time:
  it does not complete during backward either;
- a tensor that gets more accumulations than counted blocks its sub-group, or, if the sub-group
  already completed (its norms or update may be running on a partial gradient), raises.
Whatever did not complete during backward is handled by the container's ``step()``.
"""

from __future__ import annotations

from collections.abc import Sequence


class GradientReadiness:
    def __init__(self, group_of: Sequence[int], num_groups: int):
        """``group_of[i]``: the sub-group of tensor ``i`` (model order)."""
        self._group_of = list(group_of)
        self._members: list[list[int]] = [[] for _ in range(num_groups)]
        for i, g in enumerate(self._group_of):
            self._members[g].append(i)
        self.armed = False
        self._expected: list[int] | None = None
        self._seen = [0] * len(self._group_of)
        self._remaining = [0] * num_groups
        self._blocked = [True] * num_groups
        self._complete = [False] * num_groups

    def arm(self) -> None:
        """The next backward is the step's last: count its accumulations."""
        self.armed = True
        self._seen = [0] * len(self._seen)
        self._complete = [False] * len(self._complete)
        for g, members in enumerate(self._members):
            counts = [0] if self._expected is None else [self._expected[i] for i in members]
            self._remaining[g] = len(members)
            self._blocked[g] = min(counts) == 0

    def on_grad(self, i: int) -> int | None:
        """Tensor ``i`` got an accumulation: the sub-group that is complete with it, if any."""
        if not self.armed:
            return None
        self._seen[i] += 1
        g, expected = self._group_of[i], self._expected
        if expected is None or self._seen[i] > expected[i]:
            if self._complete[g]:
                raise RuntimeError(
                    f"a parameter of optimizer sub-group {g} received more gradient accumulations in this "
                    "backward than in the previous step's, after the sub-group had started; set optim.overlap=false"
                )
            self._blocked[g] = True  # the counts changed: this sub-group waits for step()
            return None
        if self._blocked[g] or self._seen[i] < expected[i]:
            return None
        self._remaining[g] -= 1
        if self._remaining[g] > 0:
            return None
        self._complete[g] = True
        return g

    def disarm(self, record: bool = True) -> None:
        """The step is over; its counts are the next step's expectation (``record``: it succeeded)."""
        if self.armed and record:
            self._expected = list(self._seen)
        self.armed = False
