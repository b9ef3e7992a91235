"""Providers: where nodes come from (DESIGN §5, step 5: "provision offer X").

- `LocalProvider`: Shuttle processes on this machine, one per offer started (tests, demos,
  benchmarks).
- `StaticProvider`: hosts that lease spare capacity and join on their own.
- `AwsProvider`: EC2 instances (needs the `aws` extra: boto3).
- `load_catalog`: offers of the clouds treadle knows, with their published prices.
"""

from treadle.weaver.providers.aws import AwsProvider
from treadle.weaver.providers.base import (
    JoinInfo,
    Provider,
    Provisioned,
    ProvisionError,
    Quota,
)
from treadle.weaver.providers.catalog import CatalogError, default_catalog_paths, load_catalog
from treadle.weaver.providers.local import LocalProvider
from treadle.weaver.providers.static import StaticProvider, static_join_command

__all__ = [
    "AwsProvider",
    "CatalogError",
    "JoinInfo",
    "LocalProvider",
    "Provider",
    "ProvisionError",
    "Provisioned",
    "Quota",
    "StaticProvider",
    "default_catalog_paths",
    "load_catalog",
    "static_join_command",
]
