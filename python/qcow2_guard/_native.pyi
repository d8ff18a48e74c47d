"""Type stubs of the private native module (built from python/rust/lib.rs)."""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

_Source = Union[str, bytes, Tuple[int, Callable[[int, int], bytes]]]
# allow_backing, allow_data_file, allow_encryption (bool), max_virtual_size
# (Optional[int]): built by _api._policy.
_Policy = Dict[str, Any]

def check_image(
    source: _Source,
    filename: str,
    options: _Policy,
    metadata_only: bool,
    threads: Optional[int],
    data_file: Optional[_Source] = None,
) -> Dict[str, Any]: ...
def info_image(
    source: _Source,
    filename: str,
    actual_size: Optional[int],
    options: _Policy,
) -> Dict[str, Any]: ...
def probe_header(prefix: bytes) -> Optional[Tuple[bool, Optional[int]]]: ...
def convert_image(
    source: _Source,
    filename: str,
    dst: Any,
    backing: Optional[_Source],
    data_file: Optional[_Source],
    options: _Policy,
    progress: Optional[Callable[[int, int], Any]],
    threads: Optional[int],
) -> List[Dict[str, Any]]: ...

class StreamInspector:
    def __init__(
        self,
        filename: str,
        options: _Policy,
        metadata_only: bool,
        spool: Optional[Union[_Source, Tuple[Callable[[], int], Callable[[int, int], bytes]]]],
    ) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def early(self) -> Tuple[str, List[Dict[str, Any]]]: ...
    def position(self) -> int: ...
    def retained_bytes(self) -> int: ...
    def finish(self) -> Tuple[Dict[str, Any], List[Tuple[int, int]]]: ...
