import pytest

from seq2seq.model import EncoderDecoder
from seq2seq.testing import tiny_model


@pytest.fixture
def model() -> EncoderDecoder:
    return tiny_model()
