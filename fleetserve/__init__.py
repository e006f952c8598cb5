"""fleetserve: the one import name the installed distribution claims.

The code lives in the repository's server/, loaders/ and protos/ folders; this package
holds them as subpackages (symbolic links in a checkout, copies in a wheel), so nothing
else is put on a user's import path.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fleetserve")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
