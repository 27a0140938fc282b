"""URL signing for providers whose asset hrefs need a token (Planetary Computer SAS)."""

from __future__ import annotations

import os
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
    if provider.signing == "sas-token":  # a private container: one token for every href
        token = os.environ.get(provider.token_env or "", "").lstrip("?")
        if not token:
            raise SpecError(f"provider {provider.name}: signing sas-token reads its token from "
                            f"the environment variable {provider.token_env or '(token_env unset)'}, "
                            "which is empty")
        return lambda href: f"{href}{'&' if '?' in href else '?'}{token}"
    raise SpecError(f"provider {provider.name}: unknown signing '{provider.signing}' "
                    "(planetary-computer or sas-token)")
