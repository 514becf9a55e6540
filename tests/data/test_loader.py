"""Batches from worker processes, and the inputs callable that feeds a net's data layers."""

import numpy as np
import pytest
import torch

from caffelayers import CaffeFormatError, CaffeLayersError, LabelError, Net
from caffelayers.data import BatchLoader, label_rules, net_inputs, open_source
from caffelayers.proto import io

cv2 = pytest.importorskip("cv2", reason="the data extra (opencv-python-headless) is missing")


def write_list(folder, count, classes=3, size=(5, 4)):
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        cv2.imwrite(str(folder / "img" / f"{i}.png"),
                    rng.integers(0, 256, size, dtype=np.uint8))
        lines.append(f"{folder}/img/{i}.png {i % classes}\n")
    (folder / "list.txt").write_text("".join(lines))
    return folder / "list.txt"


def image_param(source, batch=3, shuffle="true"):
    return io.parse_prototxt(f'''layer {{ name: "data" type: "ImageData" top: "data"
        top: "label" transform_param {{ mirror: true crop_size: 3 }}
        image_data_param {{ source: "{source}" batch_size: {batch} is_color: false
        shuffle: {shuffle} }} }}''').layer[0]


def test_workers_deliver_the_batches_of_the_stream_in_order(tmp_path):
    source = open_source(image_param(write_list(tmp_path, 7)), "TRAIN", seed=2)
    loader = BatchLoader(source, workers=2, start=1)
    try:
        got = [loader() for _ in range(4)]
    finally:
        loader.close()
    for index, batch in enumerate(got, start=1):
        expected = source.batch(index)
        assert set(batch) == {"data", "label"}
        for top in batch:
            assert isinstance(batch[top], torch.Tensor)
            np.testing.assert_array_equal(batch[top].numpy(), expected[top])


def test_a_worker_error_arrives_with_its_file_and_line(tmp_path):
    listing = write_list(tmp_path, 4)
    (tmp_path / "img" / "2.png").unlink()
    source = open_source(image_param(listing, batch=4, shuffle="false"), "TEST")
    loader = BatchLoader(source, workers=1)
    try:
        with pytest.raises(CaffeFormatError, match="not found") as caught:
            loader()
    finally:
        loader.close()
    assert caught.value.path == str(listing) and caught.value.line == 3


NET = '''name: "tiny"
layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  transform_param {{ crop_size: 3 }}
  image_data_param {{ source: "{source}" batch_size: 3 is_color: false }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "fc6" type: "MarginInnerProduct" bottom: "fc" bottom: "label" top: "fc6"
  margin_inner_product_param {{ num_output: {classes} type: DOUBLE
    weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc6" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 7 }} }}
'''


def tiny_net(tmp_path, classes, count=5):
    listing = write_list(tmp_path, count, classes=3)
    (tmp_path / "net.prototxt").write_text(NET.format(source=listing, classes=classes))
    return Net(tmp_path / "net.prototxt", phase="TRAIN")


def test_net_inputs_feed_a_forward_pass(tmp_path):
    net = tiny_net(tmp_path, classes=3)
    rules = label_rules(net.graph, "label")
    assert [(r.classes, r.ignore_label) for r in rules] == [(3, None), (3, 7)]
    inputs = net_inputs(net, workers=0)
    try:
        batch = inputs()
        assert inputs.items_per_batch == 3 and inputs.last_batch is batch
        np.testing.assert_array_equal(batch["label"], [0, 1, 2])
        assert torch.isfinite(net(**batch)["loss"])
    finally:
        inputs.close()


def test_net_inputs_check_labels_against_the_classes(tmp_path):
    net = tiny_net(tmp_path, classes=2)
    with pytest.raises(LabelError, match=r"list.txt:3: .*label 2 is outside the classes: "
                       r"layer 'fc6' \(MarginInnerProduct\) accepts \[0, 2\)"):
        net_inputs(net, workers=0)


def test_net_inputs_check_the_shapes_the_net_was_built_for(tmp_path):
    net = tiny_net(tmp_path, classes=3)
    param = net.graph.nodes[0].param
    param.transform_param.crop_size = 2
    with pytest.raises(CaffeLayersError, match=r"gives 'data' items of shape \(1, 2, 2\), the "
                       r"net was built for \(1, 3, 3\)"):
        net_inputs(net, workers=0)
