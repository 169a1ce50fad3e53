"""The entropy-dynamics probe, outside the training path: the estimators of each token's entropy
change and the statistics that compare them with the measured change (:mod:`.entropy_dynamics`), and
the Lightning callback that measures them during training (:mod:`.callback`, ``callbacks.entropy_probe``).
Training never imports this package; the probe reads the step through :class:`steer.observers.StepObserver`."""
