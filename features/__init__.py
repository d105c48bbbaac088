"""features: the data contract and everything that turns raw tables into the model's view.

The public API is exported here; submodules are stages (``contract``, ``workspace``,
``demo``, ``importing``, ``scenario``).
"""

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
from features.scenario import PlantedTruth, ScenarioConfig, World, make_world, write_world
from features.workspace import Workspace, WorkspaceError, summarize, write_workspace

__all__ = [
    "TABLES",
    "ColumnSpec",
    "ContractError",
    "OrderLineMapping",
    "PlantedTruth",
    "ScenarioConfig",
    "TableSpec",
    "Workspace",
    "WorkspaceError",
    "World",
    "coerce_table",
    "import_table",
    "import_transactions",
    "load_complete_journey",
    "make_world",
    "map_complete_journey",
    "order_lines_to_tables",
    "read_table_file",
    "summarize",
    "validate_foreign_keys",
    "validate_table",
    "validate_tables",
    "write_demo_workspace",
    "write_workspace",
    "write_world",
]
