"""The package imports and the bare net runs end to end."""

import numpy as np

from skuq import MAPClassifier
from tests._helpers import make_classifier_net


def test_map_classifier_end_to_end(digits):
    est = MAPClassifier(make_classifier_net(max_epochs=5), random_state=0)
    est.fit(digits.X_train, digits.y_train)
    proba = est.predict_proba(digits.X_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert est.score(digits.X_test, digits.y_test) > 0.8
