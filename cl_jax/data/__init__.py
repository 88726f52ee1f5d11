"""Data: labelled sources, scenarios (task sequences), grain pipelines."""
from cl_jax.data.pipeline import task_data, test_batches, train_dataset, train_iterator
from cl_jax.data.scenarios import Scenario, Task, make_scenario
from cl_jax.data.sources import LabelledData, check_source, load_source
