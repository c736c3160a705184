"""The explicit attention state: fused numerator and denominator, one per key/value head.

    S = sum_j phi(k_j) [v_j, 1]^T        in R^{D x (Ev + 1)}

A state is a value: operations return new states and never modify one passed in.
It is the sum over the tokens it has seen, so the states of disjoint segments add
(``state_a + state_b``): the basis of streaming and of context parallelism.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ._files import write_atomic
from .basis import feature_dim, state_size
from .exact_keys import ExactKeys
from .hybrid import check_slots
from .budget import check_budget, format_bytes

__all__ = ["SATAState", "StateFileError"]

_FORMAT = "sata.SATAState"
_VERSION = 1          # plain states
_VERSION_EXACT = 2    # states with window / sink keys (``exact``)


class StateFileError(ValueError):
    """A state file is missing, truncated, corrupt, or of another configuration."""


@dataclass(frozen=True, eq=False)
class SATAState:
    r"""State of symmetry-aware Taylor attention after some number of tokens.

    Attributes:
        kv (torch.Tensor): ``[..., Hkv, D, Ev + 1]`` fused state, float32 or float64; the last
            column is the normaliser ``sum_j phi(k_j)``. ``D = C(d_key + n_taylor - 1, n_taylor - 1)``.
        n_taylor (int): number of Taylor terms the state was built with.
        d_key (int): head size of queries and keys ``E``.
        d_value (int): head size of values ``Ev``.
        scale (float): score scale ``s = scale * q.k`` the state was built with.
        n_tokens (int): key positions absorbed so far (padded positions included).
        window (int): recent positions attended exactly (``MATH.md`` section 6); 0 for the plain op.
        sinks (int): first kept keys of the stream attended exactly; 0 for the plain op.
        exact (ExactKeys | None): the keys and values of the window and the sinks (None when both are 0).
            With a window or sinks ``kv`` holds only the keys outside every query's reach.
        key_centre (torch.Tensor | None): ``[..., Hkv, E]``, a key vector subtracted from every key
            absorbed into ``kv`` (fixed by the first re-centred call: the mean of its kept keys after the
            sinks). Scores change by one constant per query, which the re-centred series absorbs exactly; it
            keeps the series' coefficients small, so float32 holds (``docs/WINDOW.md``). None: keys absorbed as
            they are.
            A constant of the stream: computed from detached keys, so no gradient flows through it (the
            outputs do not depend on it; ``kv``'s gradient with respect to the first call's keys treats it
            as fixed).

    Gradients flow through ``kv``: pass a state that requires grad, get a state whose
    ``kv`` has a graph (truncated backpropagation through time works by ``detach()``).
    """

    kv: torch.Tensor
    n_taylor: int
    d_key: int
    d_value: int
    scale: float
    n_tokens: int = 0
    window: int = 0
    sinks: int = 0
    exact: ExactKeys | None = None
    key_centre: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kv, torch.Tensor):
            raise TypeError(f"SATAState.kv must be a tensor, got {type(self.kv).__name__}")
        if self.kv.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"SATAState.kv must be float32 or float64 (states accumulate in at least float32), got {self.kv.dtype}"
            )
        for name in ("n_taylor", "d_key", "d_value", "n_tokens", "window", "sinks"):
            value = getattr(self, name)
            low = 1 if name in ("n_taylor", "d_key", "d_value") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SATAState.{name} must be a {'positive' if low else 'non-negative'} int, got {value!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if not math.isfinite(self.scale):
            raise ValueError(f"SATAState.scale must be finite, got {self.scale}")
        D = feature_dim(self.d_key, self.n_taylor)
        if self.kv.dim() < 3 or self.kv.shape[-2:] != (D, self.d_value + 1):
            raise ValueError(
                f"SATAState.kv must be [..., Hkv, {D}, {self.d_value + 1}] for d_key={self.d_key}, "
                f"d_value={self.d_value}, n_taylor={self.n_taylor}; got {tuple(self.kv.shape)}"
            )
        if (self.exact is None) != (self.window == 0 and self.sinks == 0):
            raise ValueError("SATAState.exact holds the window and sink keys: give it exactly when window or sinks > 0")
        if self.exact is not None:
            self.exact.check(self.kv.shape[:-2], self.window, self.sinks, self.d_key, self.d_value)
        if self.key_centre is not None and (
            not isinstance(self.key_centre, torch.Tensor) or self.key_centre.shape != (*self.kv.shape[:-2], self.d_key)
        ):
            raise ValueError(f"SATAState.key_centre must be [..., Hkv, d_key] = {(*self.kv.shape[:-2], self.d_key)}")

    # ---------------------------------------------------------------- construction
    @classmethod
    def zeros(
        cls,
        batch_shape: tuple[int, ...] | torch.Size,
        n_heads: int,
        d_key: int,
        d_value: int,
        n_taylor: int,
        scale: float | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        window: int = 0,
        sinks: int = 0,
    ) -> SATAState:
        """An empty state (no tokens seen) for ``n_heads`` key/value heads.

        ``scale`` defaults to ``1/sqrt(d_key)``; ``window`` and ``sinks`` as in :func:`sata.sata_attention`. Use ``dtype=torch.float64`` for very long
        streams of float32 inputs: increments are computed in the input precision and
        summed in float64.
        """
        D = feature_dim(d_key, n_taylor)
        shape = (*tuple(batch_shape), n_heads, D, d_value + 1)
        check_slots("SATAState.zeros", window, sinks)
        # the far state and the window's and sinks' keys and values, before any of them is allocated
        heads = math.prod(shape[:-2])
        nbytes = heads * state_size(d_key, d_value, n_taylor, window=window, sinks=sinks) * dtype.itemsize
        exact = f" with window={window}, sinks={sinks}" if window or sinks else ""
        check_budget(nbytes, f"A SATA state of shape {shape}{exact} ({dtype})",
                     "Use fewer Taylor terms, smaller heads, a smaller window, fewer sinks or a smaller batch.")
        # stored D-contiguous (kv.transpose(-1, -2) is contiguous): the layout the decode kernel reads
        kv = torch.zeros((*shape[:-2], d_value + 1, D), dtype=dtype, device=device).transpose(-1, -2)
        exact = None
        if window or sinks:
            exact = ExactKeys.empty(shape[:-2], window, sinks, d_key, d_value, dtype, kv.device)
        return cls(
            kv=kv,
            n_taylor=n_taylor,
            d_key=d_key,
            d_value=d_value,
            scale=d_key**-0.5 if scale is None else scale,
            window=window,
            sinks=sinks,
            exact=exact,
        )

    @classmethod
    def _unchecked(cls, kv: torch.Tensor | None, n_taylor: int, d_key: int, d_value: int, scale: float, n_tokens: int,
                   kvT: torch.Tensor | None = None, window: int = 0, sinks: int = 0,
                   exact: ExactKeys | None = None, key_centre: torch.Tensor | None = None) -> SATAState:
        """Construct without validation: for the op's hot path, whose inputs were validated already.

        Pass ``kvT`` (the D-contiguous ``[..., Hkv, F, D]`` tensor) instead of ``kv`` to skip making
        the ``kv`` view until someone reads it (a view costs about a microsecond per decode step).
        """
        self = object.__new__(cls)
        self.__dict__.update(n_taylor=n_taylor, d_key=d_key, d_value=d_value, scale=scale, n_tokens=n_tokens,
                             window=window, sinks=sinks, exact=exact, key_centre=key_centre)
        if kv is not None:
            self.__dict__["kv"] = kv
        if kvT is not None:
            self.__dict__["_kvT"] = kvT
        return self

    def __getattr__(self, name: str):
        # only reached when ``kv`` was not made yet (see _unchecked)
        if name == "kv" and "_kvT" in self.__dict__:
            kv = self.__dict__["kv"] = self.__dict__["_kvT"].mT
            return kv
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _stored(self) -> torch.Tensor:
        """``kv`` if it was made, else the F-major tensor it would be a view of: for reading shape,
        dtype, device or ``requires_grad`` without making a view (a decode loop never needs one)."""
        d = self.__dict__
        return d["kv"] if "kv" in d else d["_kvT"]

    def _fmajor(self) -> torch.Tensor | None:
        """``kv`` as the D-contiguous ``[..., Hkv, F, D]`` tensor the kernels read, or ``None`` if
        it is stored in another layout (a state loaded from a file, say)."""
        t = self.__dict__.get("_kvT")
        if t is None:
            t = self.kv.mT
            if not t.is_contiguous():
                return None
            self.__dict__["_kvT"] = t
        return t

    # ---------------------------------------------------------------- description
    @property
    def batch_shape(self) -> torch.Size:
        return self.kv.shape[:-3]

    @property
    def n_heads(self) -> int:
        return self.kv.shape[-3]

    @property
    def feature_dim(self) -> int:
        return self.kv.shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for _, t in self._extras())
        return self.kv.numel() * self.kv.element_size() + extra

    @property
    def config(self) -> dict:
        """What must match for this state to be continued: everything but the tokens seen."""
        return {
            "n_taylor": self.n_taylor,
            "d_key": self.d_key,
            "d_value": self.d_value,
            "scale": self.scale,
            "n_heads": self.n_heads,
            "batch_shape": list(self.batch_shape),
            "window": self.window,
            "sinks": self.sinks,
        }

    def __repr__(self) -> str:
        return (
            f"SATAState(batch_shape={tuple(self.batch_shape)}, n_heads={self.n_heads}, d_key={self.d_key}, "
            f"d_value={self.d_value}, n_taylor={self.n_taylor}, scale={self.scale:g}, n_tokens={self.n_tokens}, "
            f"{f'window={self.window}, sinks={self.sinks}, ' if self.exact is not None else ''}"
            f"dtype={self.dtype}, device={self.device}, size={format_bytes(self.nbytes)})"
        )

    # ---------------------------------------------------------------- transformations
    def detach(self) -> SATAState:
        """The same state without its autograd history (truncated backpropagation through time)."""
        return self._map(torch.Tensor.detach)

    def clone(self) -> SATAState:
        return self._map(torch.Tensor.clone)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SATAState:
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def _map(self, fn) -> SATAState:
        """The same state with ``fn`` applied to every tensor (floating and index tensors alike)."""
        return replace(self, kv=fn(self.kv), exact=None if self.exact is None else self.exact.map(fn),
                       key_centre=None if self.key_centre is None else fn(self.key_centre))

    def _extras(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors besides ``kv``: the window and sink buffers and the key centre, by name."""
        extras = [] if self.exact is None else self.exact.named()
        return extras + ([] if self.key_centre is None else [("key_centre", self.key_centre)])

    def __add__(self, other: SATAState) -> SATAState:
        """Merge the states of two disjoint segments of one sequence (attention is a sum over keys)."""
        if not isinstance(other, SATAState):
            return NotImplemented
        self.check_compatible(other, what="the other state", theirs="in the other")
        if self.exact is not None or self.key_centre is not None or other.key_centre is not None:
            from ._merge import merge_exact  # needs the feature map, which needs this module
            return merge_exact(self, other)
        return replace(self, kv=self.kv + other.kv.to(self.kv.dtype), n_tokens=self.n_tokens + other.n_tokens)

    def check_compatible(self, other: SATAState | dict, what: str = "state", ours: str = "in this state",
                         theirs: str = "there") -> None:
        """Raise ``ValueError`` naming each field where ``other`` (a state or a config dict) differs, with this
        state's value (``ours`` says where it is) and the other's (``theirs``)."""
        config = other.config if isinstance(other, SATAState) else dict(other)
        diffs = [f"{k}={mine!r} {ours}, {t!r} {theirs}" for k, mine, t in self._config_diffs(config)]
        if diffs:
            raise ValueError(f"{what} comes from another configuration ({'; '.join(diffs)}): a state continues, "
                             "merges or loads only with the settings it was made with")

    def _config_diffs(self, theirs: dict) -> list[tuple[str, object, object]]:
        """``(field, ours, theirs)`` for every field of :attr:`config` that ``theirs`` gives differently."""
        return [(k, v, theirs[k]) for k, v in self.config.items() if k in theirs and theirs[k] != v]

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the state to ``path`` atomically (write to a temporary file, fsync, rename).

        A crash during the save leaves the previous file intact (and the next save removes the
        temporary it left). The file holds the
        tensor bit for bit, the configuration and a SHA-256 checksum, in
        ``torch.save`` format (loaded with ``weights_only=True``: no code is unpickled).
        """
        path = Path(path)
        kv = self.kv.detach().cpu().contiguous()
        config = {**self.config, "n_tokens": self.n_tokens, "dtype": str(kv.dtype)}
        exact = {k: t.detach().cpu().contiguous() for k, t in self._extras()}
        payload = {
            "format": _FORMAT,
            "version": _VERSION if not exact else _VERSION_EXACT,
            "config": config,
            "sha256": _digest(kv, config, exact),
            "kv": kv,
        }
        if exact:
            payload["exact"] = exact
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_atomic(path, buffer.getbuffer())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        map_location: torch.device | str | None = "cpu",
        expected: SATAState | dict | None = None,
    ) -> SATAState:
        """Read a state written by :meth:`save`, bit for bit.

        Raises :class:`StateFileError` (a ``ValueError``) if the file is missing, truncated,
        corrupt (checksum mismatch), not a SATA state, or, when ``expected`` (a state or a
        ``config`` dict) is given, of another configuration.
        """
        path = Path(path)
        if not path.is_file():
            raise StateFileError(f"no SATA state file at {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, ...
            raise StateFileError(f"{path} is not a readable SATA state file (truncated or corrupt?): {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise StateFileError(f"{path} is not a SATA state file (format tag missing)")
        if payload.get("version") not in (_VERSION, _VERSION_EXACT):
            raise StateFileError(
                f"{path} has state format version {payload.get('version')!r}; this sata reads {_VERSION} and {_VERSION_EXACT}"
            )
        kv, config, exact = payload.get("kv"), payload.get("config", {}), payload.get("exact", {})
        if not isinstance(kv, torch.Tensor) or not isinstance(config, dict) or not isinstance(exact, dict) or any(
            not isinstance(t, torch.Tensor) for t in exact.values()
        ) or _digest(kv.contiguous(), config, exact) != payload.get("sha256"):
            raise StateFileError(f"{path} is corrupt: its checksum does not match its contents")
        try:
            state = cls(
                kv=kv,
                n_taylor=config["n_taylor"],
                d_key=config["d_key"],
                d_value=config["d_value"],
                scale=config["scale"],
                n_tokens=config["n_tokens"],
                window=config.get("window", 0),
                sinks=config.get("sinks", 0),
                exact=ExactKeys(**{k: t for k, t in exact.items() if k != "key_centre"}) if "win_k" in exact else None,
                key_centre=exact.get("key_centre"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"{path} holds an invalid SATA state: {e}") from e
        if expected is not None:
            try:
                state.check_compatible(expected, what=f"state file {path}", ours="in the file", theirs="expected")
            except ValueError as e:
                raise StateFileError(str(e)) from None
        return state.to(device=map_location) if map_location is not None else state


def _digest(t: torch.Tensor, config: dict, exact: dict | None = None) -> str:
    """SHA-256 of the configuration (canonical JSON) and the tensors' bytes: a change to any is caught."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for x in (t, *(exact or {}).values()):
        if x.numel():
            h.update(x.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
