"""Type stubs of the private native module (built from python/rust/lib.rs)."""

from typing import Any, Callable, Dict, Optional, Tuple, Union

_Source = Union[str, bytes, Tuple[int, Callable[[int, int], bytes]]]

def check_image(
    source: _Source,
    filename: str,
    allow_backing: bool,
    allow_data_file: bool,
    allow_encryption: bool,
    max_virtual_size: Optional[int],
    metadata_only: bool,
) -> Dict[str, Any]: ...
def info_image(
    source: _Source,
    filename: str,
    actual_size: Optional[int],
    allow_backing: bool,
    allow_data_file: bool,
    allow_encryption: bool,
    max_virtual_size: Optional[int],
) -> Dict[str, Any]: ...
def probe_header(prefix: bytes) -> Optional[Tuple[bool, Optional[int]]]: ...
