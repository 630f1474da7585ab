"""experiments/neighbour_attributes.py: how often neighbours show the query's colour-shape pair."""

from cm3leon_jax.data.shapes import Obj, Scene
from experiments import neighbour_attributes as na


def scene(*pairs):
  return Scene(tuple(Obj(shape, colour, "small", 0, i) for i, (colour, shape) in enumerate(pairs)))


def test_rates_count_pair_colour_and_shape_over_single_object_queries():
  queries = [scene(("red", "circle")), scene(("blue", "square")),
             scene(("red", "circle"), ("blue", "square"))]  # two objects: not counted
  neighbours = [
      [scene(("red", "circle")), scene(("red", "square")), scene(("green", "circle"))],
      [scene(("red", "square"), ("blue", "circle")), scene(("green", "diamond"))],
      [scene(("red", "circle"))],
  ]
  rates = na.attribute_rates(queries, neighbours)
  assert (rates["queries"], rates["neighbours"]) == (2, 5)
  # Pair: only the first query's first neighbour. Colour: red, red; blue (in a two-object
  # neighbour). Shape: circle, circle; square (the other object of that neighbour).
  assert rates["pair"] == 1 / 5
  assert rates["colour"] == 3 / 5
  assert rates["shape"] == 3 / 5
  assert rates["queries_with_pair"] == 1 / 2


def test_a_query_without_neighbours_is_not_counted():
  rates = na.attribute_rates([scene(("red", "circle"))], [[]])
  assert rates["queries"] == 0 and rates["pair"] == 0.0


def test_a_workdir_without_neighbours_is_one_error_naming_the_directory(tmp_path, capsys):
  assert na.main(["--config", "tiny", f"--config.workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and str(tmp_path / "neighbours") in err
