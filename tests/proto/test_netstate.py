"""Phase, level and stage filtering as Caffe's Net::FilterNet and StateMeetsRule."""

import pytest
from google.protobuf import text_format

from caffelayers.errors import CaffeFormatError, CaffeLayersError
from caffelayers.proto import caffe_pb2 as pb
from caffelayers.proto.netstate import filter_net, make_state, state_meets_rule

TRAIN_VAL = """
name: "tv"
layer { name: "train_data" type: "Input" top: "data" include { phase: TRAIN } }
layer { name: "test_data" type: "Input" top: "data" include { phase: TEST } }
layer { name: "drop" type: "Dropout" bottom: "data" top: "data" exclude { phase: TEST } }
layer { name: "always" type: "ReLU" bottom: "data" top: "r" }
layer { name: "acc" type: "ReLU" bottom: "r" top: "acc" exclude { phase: TRAIN } }
"""


def names(net):
    return [layer.name for layer in net.layer]


def parse(text):
    return text_format.Parse(text, pb.NetParameter())


def test_phases():
    net = parse(TRAIN_VAL)
    assert names(filter_net(net, "TRAIN")) == ["train_data", "drop", "always"]
    assert names(filter_net(net, "TEST")) == ["test_data", "always", "acc"]
    assert names(filter_net(net, pb.TRAIN)) == names(filter_net(net, "train"))


def test_exclude_is_not_include():
    """Reading ``exclude`` as ``include[0]`` would keep 'drop' in TEST and drop it in TRAIN."""
    net = parse('layer { name: "drop" type: "Dropout" bottom: "x" top: "x" '
                'exclude { phase: TEST } }')
    assert names(filter_net(net, "TRAIN")) == ["drop"]
    assert names(filter_net(net, "TEST")) == []


def test_any_include_rule_suffices():
    net = parse('layer { name: "l" type: "ReLU" include { phase: TRAIN } '
                'include { stage: "deploy" } }')
    assert names(filter_net(net, "TRAIN")) == ["l"]
    assert names(filter_net(net, "TEST")) == []
    assert names(filter_net(net, "TEST", stages=["deploy"])) == ["l"]


def test_any_exclude_rule_removes():
    net = parse('layer { name: "l" type: "ReLU" exclude { phase: TRAIN } '
                'exclude { stage: "fast" } }')
    assert names(filter_net(net, "TEST")) == ["l"]
    assert names(filter_net(net, "TEST", stages=["fast"])) == []


@pytest.mark.parametrize("rule, level, stages, meets", [
    ("min_level: 1", 0, (), False),
    ("min_level: 1", 1, (), True),
    ("max_level: 2", 3, (), False),
    ("min_level: 1 max_level: 2", 2, (), True),
    ('stage: "a" stage: "b"', 0, ("a",), False),
    ('stage: "a" stage: "b"', 0, ("b", "a", "c"), True),
    ('not_stage: "a"', 0, ("a",), False),
    ('not_stage: "a"', 0, ("b",), True),
    ('phase: TRAIN stage: "a"', 0, ("a",), False),  # the state's phase is TEST
    ("", 5, ("x",), True),
])
def test_state_meets_rule(rule, level, stages, meets):
    state = pb.NetState(phase=pb.TEST, level=level, stage=list(stages))
    assert state_meets_rule(state, text_format.Parse(rule, pb.NetStateRule())) is meets


def test_net_state_gives_defaults():
    net = parse('state { phase: TRAIN level: 2 stage: "s" }\n'
                'layer { name: "l" type: "ReLU" include { phase: TRAIN min_level: 2 stage: "s" } }')
    assert names(filter_net(net)) == ["l"]
    assert names(filter_net(net, "TEST")) == []
    assert names(filter_net(net, level=1)) == []
    state = make_state(net, stages=["t"])
    assert (state.phase, state.level, list(state.stage)) == (pb.TRAIN, 2, ["s", "t"])
    assert make_state(pb.NetParameter()).phase == pb.TEST


def test_kept_layers_get_the_phase_unless_they_set_one():
    net = parse('layer { name: "a" type: "Dropout" }\n'
                'layer { name: "b" type: "Dropout" phase: TRAIN }')
    filtered = filter_net(net, "TEST")
    assert [layer.phase for layer in filtered.layer] == [pb.TEST, pb.TRAIN]
    assert filtered.state.phase == pb.TEST
    assert not net.layer[0].HasField("phase")  # the argument is not modified


def test_v1_net_is_upgraded_then_filtered():
    net = parse('layers { name: "a" type: RELU include { phase: TRAIN } }\n'
                'layers { name: "b" type: RELU }')
    filtered = filter_net(net, "TEST")
    assert [(layer.name, layer.type) for layer in filtered.layer] == [("b", "ReLU")]


def test_include_and_exclude_together():
    net = parse('layer { name: "l" include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(CaffeFormatError, match="both 'include' and 'exclude'"):
        filter_net(net, "TRAIN")


def test_duplicate_top_after_filtering():
    net = parse(TRAIN_VAL + 'layer { name: "again" type: "ReLU" bottom: "r" top: "data" }')
    with pytest.raises(CaffeFormatError, match="'data' is already produced by layer "
                                               "'train_data'") as info:
        filter_net(net, "TRAIN", path="tv.prototxt")
    assert info.value.path == "tv.prototxt"


def test_in_place_is_positional():
    """Caffe's in-place test is ``top[i] == bottom[i]``; a top equal to another bottom is not."""
    net = parse('layer { name: "in" type: "Input" top: "a" top: "b" }\n'
                'layer { name: "ok" type: "Eltwise" bottom: "a" bottom: "b" top: "a" }\n'
                'layer { name: "bad" type: "Eltwise" bottom: "a" bottom: "b" top: "b" }')
    with pytest.raises(CaffeFormatError, match="layer 'bad'.*'b' is already produced"):
        filter_net(net)


def test_bad_phase():
    with pytest.raises(CaffeLayersError, match="TRAIN or TEST"):
        filter_net(pb.NetParameter(), "VAL")
