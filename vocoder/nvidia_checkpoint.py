"""Reading NVIDIA's published WaveGlow checkpoints as data, without running their code.

NVIDIA's files pickle the whole model object (``{"model": glow.WaveGlow(...), ...}``), so
``torch.load(weights_only=True)`` refuses them and a plain ``torch.load`` would run whatever
the pickle names. :func:`read_nvidia_checkpoint` reads them as data instead, with a restricted
unpickler that calls nothing outside a short allowlist (tensor and ``OrderedDict``
rebuilders, plain containers) and turns every other class or callable into an inert stub that
only records the state it is given. The state of the stubbed ``nn.Module`` objects is then
walked through ``_parameters``, ``_buffers`` and ``_modules`` into an ordinary flat state
dict. Both of torch's file layouts are read: the zip archive (torch >= 1.6: ``*/data.pkl``
plus one ``*/data/<key>`` entry per storage) and the older single stream (magic number,
protocol, system info, the pickle, the list of storage keys, then each storage's bytes as an
int64 element count followed by the elements). The original ``glow`` code is not needed.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vocoder.errors import InputError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32,
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


# ----------------------------------------------------------------------------- safe unpickling

class _Stub:
    """Inert stand-in for a class or callable named in the file: constructing it, calling it
    or restoring its state records the arguments and nothing else."""

    __slots__ = ("stub_args", "stub_state")
    stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.stub_args, obj.stub_state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.stub_state = state

    def __repr__(self) -> str:
        return f"<stub {self.stub_name}>"


@dataclass(frozen=True)
class _StorageKind:
    """What ``torch.FloatStorage`` and friends unpickle to: just the element type."""

    dtype: torch.dtype


@dataclass
class _Storage:
    """A storage as a flat tensor; tensors are strided views of it."""

    data: Tensor


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    # as_strided checks the view against the storage's bounds.
    return storage.data.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_parameter(data, *_ignored) -> Tensor:
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


def _rebuild_from_type(func, _new_type, args, _state) -> Tensor:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise pickle.UnpicklingError("unsupported tensor reconstruction")
    return func(*args)


def _reconstructor(cls, _base, _state=None):
    if not (isinstance(cls, type) and issubclass(cls, _Stub)):
        raise pickle.UnpicklingError("unsupported object reconstruction")
    return cls()


def _latin1_bytes(text, encoding="latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unsupported byte-string encoding")
    return text.encode("latin1")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _latin1_bytes,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves globals from :data:`_ALLOWED` or as stubs; never imports or calls anything
    else. ``storage(args)`` turns a persistent storage id into a :class:`_Storage`."""

    def __init__(self, file, storage=None):
        super().__init__(file)
        self._storage = storage
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles written by Python 3 name some modules by their Python 2 names.
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        qualname = f"{module}.{name}"
        if qualname not in self._stubs:
            self._stubs[qualname] = type(str(name), (_Stub,),
                                         {"__slots__": (), "stub_name": qualname})
        return self._stubs[qualname]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError("malformed persistent id")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:
            return pid[1]  # a class pickled with its source code: keep the stub, ignore the code
        if kind == "storage" and self._storage is not None:
            return self._storage(pid[1:])
        raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")


def _from_bytes(raw: bytes, dtype: torch.dtype, little_endian: bool) -> Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if not little_endian and itemsize > 1:
        flat = flat.view(-1, itemsize).flip(1).reshape(-1)
    return flat.view(dtype)


def _storage_dtype(kind) -> tuple[torch.dtype, int]:
    if not isinstance(kind, _StorageKind):
        raise pickle.UnpicklingError("storage of unknown type")
    return kind.dtype, torch.empty(0, dtype=kind.dtype).element_size()


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError("zip archive without data.pkl (not a torch.save file)")
        prefix = pickles[0][: -len("data.pkl")]
        little = True
        if f"{prefix}byteorder" in archive.namelist():
            little = archive.read(f"{prefix}byteorder").strip() != b"big"
        storages: dict[str, _Storage] = {}

        def storage(args) -> _Storage:
            if len(args) != 4:
                raise pickle.UnpicklingError("malformed storage id")
            kind, key, _location, numel = args
            dtype, itemsize = _storage_dtype(kind)
            key = str(key)
            if key not in storages:
                raw = archive.read(f"{prefix}data/{key}")
                if not isinstance(numel, int) or numel < 0 or len(raw) < numel * itemsize:
                    raise pickle.UnpicklingError(f"storage {key} is truncated")
                storages[key] = _Storage(_from_bytes(raw[:numel * itemsize], dtype, little))
            return storages[key]

        return _SafeUnpickler(io.BytesIO(archive.read(pickles[0])), storage).load()


def _load_legacy(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            magic = _SafeUnpickler(f).load()
        except Exception:  # noqa: BLE001 - whatever the bytes are, they are not ours
            magic = None
        if magic != _LEGACY_MAGIC:
            raise ValueError("neither a zip archive nor a legacy torch.save stream")
        if _SafeUnpickler(f).load() != _LEGACY_PROTOCOL:
            raise ValueError("unsupported legacy PyTorch protocol version")
        sys_info = _SafeUnpickler(f).load()
        little = not isinstance(sys_info, dict) or bool(sys_info.get("little_endian", True))
        roots: dict[str, _Storage] = {}

        def storage(args) -> _Storage:
            if len(args) != 5:
                raise pickle.UnpicklingError("malformed storage id")
            kind, key, _location, numel, view = args
            dtype, itemsize = _storage_dtype(kind)
            if not isinstance(numel, int) or not 0 <= numel * itemsize <= size:
                raise pickle.UnpicklingError("storage larger than the file")
            if str(key) not in roots:
                roots[str(key)] = _Storage(torch.zeros(numel, dtype=dtype))
            root = roots[str(key)]
            if view is None:
                return root
            _view_key, offset, view_size = view
            return _Storage(root.data[int(offset):int(offset) + int(view_size)])

        result = _SafeUnpickler(f, storage).load()
        # The storages' bytes follow the pickle, in the order of this key list.
        for key in _SafeUnpickler(f).load():
            root = roots.get(str(key))
            header = f.read(8)
            if root is None or len(header) != 8:
                raise ValueError(f"storage {key} is missing or truncated")
            count = int.from_bytes(header, "little" if little else "big", signed=True)
            nbytes = count * root.data.element_size()
            raw = f.read(nbytes) if 0 <= nbytes <= size else b""
            if count != root.data.numel() or len(raw) != nbytes:
                raise ValueError(f"storage {key} is truncated")
            root.data.copy_(_from_bytes(raw, root.data.dtype, little))
        return result


def _module_tensors(stub: _Stub, prefix: str, out: dict[str, Tensor], seen: set[int]) -> None:
    if id(stub) in seen:
        return
    seen.add(id(stub))
    state = stub.stub_state
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if not isinstance(state, dict):
        return
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group)
        if isinstance(entries, dict):
            for name, value in entries.items():
                if isinstance(value, Tensor) and name not in skip:
                    out[prefix + str(name)] = value.detach().clone()
    children = state.get("_modules")
    if isinstance(children, dict):
        for name, child in children.items():
            if isinstance(child, _Stub):
                _module_tensors(child, f"{prefix}{name}.", out, seen)


def _find_state_dict(obj) -> dict[str, Tensor]:
    if isinstance(obj, _Stub):
        out: dict[str, Tensor] = {}
        _module_tensors(obj, "", out, set())
        return out
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj:
                return _find_state_dict(obj[key])
        return {str(k): v.detach().clone() for k, v in obj.items() if isinstance(v, Tensor)}
    return {}


def read_nvidia_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Flat state dict (NVIDIA's names, ``module.`` prefixes removed) of a WaveGlow file: a
    pickled model object under ``model`` (NVIDIA's releases), a ``state_dict`` entry, or a
    plain state dict; zip or legacy torch format. Nothing in the file is executed.

    Raises :class:`~vocoder.errors.InputError` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        obj = _load_zip(path) if is_zip else _load_legacy(path)
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - any malformed content means the same to the user
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(path, f"not a readable PyTorch checkpoint ({problem})") from None
    state = {}
    for name, tensor in _find_state_dict(obj).items():
        while name.startswith("module."):
            name = name[len("module."):]
        state[name] = tensor
    if not state:
        raise InputError(path, "holds no model weights (no 'model' object or state dict)")
    return state
