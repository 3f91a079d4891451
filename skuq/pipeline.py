"""Pipelines that keep the uncertainty: a :class:`~sklearn.pipeline.Pipeline` with
``predict_uncertainty`` and ``predict_distribution``.

scikit-learn's ``Pipeline`` already passes ``predict(X, return_std=True)``,
``predict_proba`` and ``decision_function`` through to the final step; the two
skuq methods it does not know are added here, applied to the output of the
transformers, exactly as ``predict`` is. Everything else (``clone``,
``get_params``/``set_params`` with ``step__param`` names, grid search,
``memory``) is scikit-learn's own.
"""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.pipeline import make_pipeline as _sklearn_make_pipeline
from sklearn.utils.metaestimators import available_if

__all__ = ["UQPipeline", "make_pipeline"]


def _final_step_has(attr: str):
    def check(pipe) -> bool:
        getattr(pipe._final_estimator, attr)  # AttributeError: hidden, as scikit-learn does
        return True

    return check


class UQPipeline(Pipeline):
    """A scikit-learn ``Pipeline`` that also exposes the final step's uncertainty.

    Same parameters as :class:`sklearn.pipeline.Pipeline`. The transformers are
    applied to ``X`` and the result goes to the final skuq estimator's
    ``predict_uncertainty`` or ``predict_distribution``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skorch import NeuralNetRegressor
    >>> from skuq import LaplaceRegressor
    >>> from skuq.nets import MLP
    >>> from skuq.pipeline import make_pipeline
    >>> X = np.random.default_rng(0).normal(size=(40, 3)) * 100
    >>> y = X[:, 0] / 100
    >>> net = NeuralNetRegressor(MLP, max_epochs=2, train_split=None, verbose=0)
    >>> pipe = make_pipeline(StandardScaler(), LaplaceRegressor(net, random_state=0)).fit(X, y)
    >>> pipe.predict_uncertainty(X[:3]).shape, pipe.predict(X[:3], return_std=True)[1].shape
    ((3,), (3,))
    >>> sorted(pipe.get_params())[:2]
    ['laplaceregressor', 'laplaceregressor__batch_size']
    """

    def _transform_for_final(self, X):
        Xt = X
        for _, _, transformer in self._iter(with_final=False):
            Xt = transformer.transform(Xt)
        return Xt

    @available_if(_final_step_has("predict_uncertainty"))
    def predict_uncertainty(self, X, **params):
        """The final step's ``predict_uncertainty`` on the transformed ``X``.

        Parameters
        ----------
        X : array-like
            Raw inputs; every transformer of the pipeline is applied.
        **params
            Passed on, e.g. ``kind="mutual_information"``.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        return self.steps[-1][1].predict_uncertainty(self._transform_for_final(X), **params)

    @available_if(_final_step_has("predict_distribution"))
    def predict_distribution(self, X, **params):
        """The final step's ``predict_distribution`` on the transformed ``X``.

        Parameters
        ----------
        X : array-like
            Raw inputs; every transformer of the pipeline is applied.
        **params
            Passed on.

        Returns
        -------
        OutputDistribution
        """
        return self.steps[-1][1].predict_distribution(self._transform_for_final(X), **params)


def make_pipeline(*steps, memory=None, transform_input=None, verbose: bool = False) -> UQPipeline:
    """Build a :class:`UQPipeline` from estimators, naming the steps by class, as
    :func:`sklearn.pipeline.make_pipeline` does.

    Parameters
    ----------
    *steps : estimators
        Transformers, then (last) the skuq estimator.
    memory, transform_input, verbose
        As for :func:`sklearn.pipeline.make_pipeline`.

    Returns
    -------
    UQPipeline

    Examples
    --------
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skuq import MAPClassifier
    >>> from skuq.pipeline import make_pipeline
    >>> pipe = make_pipeline(StandardScaler(), MAPClassifier(None))
    >>> [name for name, _ in pipe.steps]
    ['standardscaler', 'mapclassifier']
    """
    pipe = _sklearn_make_pipeline(
        *steps, memory=memory, transform_input=transform_input, verbose=verbose
    )
    return UQPipeline(pipe.steps, memory=memory, transform_input=transform_input, verbose=verbose)
