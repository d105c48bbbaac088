"""features: the data contract and everything that turns raw tables into the model's view.

The public API is exported here; submodules are stages (``contract``, ``workspace``,
``catalog``, ``demo``, ``importing``, ``scenario``).
"""

from features.builder import BasketLift, FeatureBuilder, FeatureMatrix, Requests
from features.catalog import (
    NON_PRODUCT_RULES,
    NonProductRule,
    non_product_categories,
    non_product_reason,
)
from features.claims import Catalogue, RowContext, Statement, catalogue_at, row_context
from features.contract import (
    TABLES,
    ColumnSpec,
    ContractError,
    TableSpec,
    coerce_table,
    validate_foreign_keys,
    validate_table,
    validate_tables,
)
from features.demo import load_complete_journey, map_complete_journey, write_demo_workspace
from features.importing import (
    OrderLineMapping,
    import_table,
    import_transactions,
    order_lines_to_tables,
    read_table_file,
)
from features.registry import FEATURES, FeatureSpec, feature_names, phrase
from features.scenario import PlantedTruth, ScenarioConfig, World, make_world, write_world
from features.snapshot import Snapshot, load_snapshot
from features.workspace import Workspace, WorkspaceError, summarize, write_workspace

__all__ = [
    "FEATURES",
    "NON_PRODUCT_RULES",
    "TABLES",
    "BasketLift",
    "Catalogue",
    "ColumnSpec",
    "ContractError",
    "FeatureBuilder",
    "FeatureMatrix",
    "FeatureSpec",
    "NonProductRule",
    "OrderLineMapping",
    "PlantedTruth",
    "Requests",
    "RowContext",
    "ScenarioConfig",
    "Snapshot",
    "Statement",
    "TableSpec",
    "Workspace",
    "WorkspaceError",
    "World",
    "catalogue_at",
    "coerce_table",
    "feature_names",
    "import_table",
    "import_transactions",
    "load_complete_journey",
    "load_snapshot",
    "make_world",
    "map_complete_journey",
    "non_product_categories",
    "non_product_reason",
    "order_lines_to_tables",
    "phrase",
    "read_table_file",
    "row_context",
    "summarize",
    "validate_foreign_keys",
    "validate_table",
    "validate_tables",
    "write_demo_workspace",
    "write_workspace",
    "write_world",
]
