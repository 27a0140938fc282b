"""URL signing for providers whose asset hrefs need a token (Planetary Computer SAS)."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import SpecError
from .providers import Provider


def url_signer(provider: Provider) -> Callable[[str], str] | None:
    """A function that signs one href right before it is read (tokens expire), or None.

    Signed URLs are only handed to the reader: never logged, returned or written.
    """
    if provider.signing is None:
        return None
    if provider.signing == "planetary-computer":
        try:
            import planetary_computer
        except ImportError:
            raise SpecError("reading from planetary-computer needs the 'planetary-computer' "
                            "package: pip install 'anysat[cloud]'") from None
        return planetary_computer.sign_url
    raise SpecError(f"provider {provider.name}: unknown signing '{provider.signing}'")
