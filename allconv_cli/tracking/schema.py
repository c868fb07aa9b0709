"""The tracking schema: every name allconv writes to MLflow and Optuna, and the one status type.

Writers (the tracked run, the study's parent run, the trials) and readers (the report, ``visualize``) import these
names; no ``allconv.`` tag is spelled anywhere else, so renaming one is one edit and a typo is an AttributeError.
Users' stores hold runs written with these exact strings: changing a value here orphans their history.
Torch-, MLflow- and Optuna-free (the CLI and the report import it cheaply).
"""

from __future__ import annotations

from enum import StrEnum

PREFIX = "allconv."


class Tag:
    """MLflow run tags. Values are strings; the comment says what they hold."""

    # what a run trains, and where (every run)
    ROLE = PREFIX + "role"  # study (a search's parent run), trial, final (a retrain on train+val); absent for train
    MODEL = PREFIX + "model"
    BRANCH = PREFIX + "branch"
    NETWORK = PREFIX + "network"  # the registry name, e.g. allconv_c_allcnn
    DATASET = PREFIX + "dataset"
    DATA_HASH = PREFIX + "data_hash"  # content hash of the data and its preprocessing
    DEVICE = PREFIX + "device"
    DEVICE_NAME = PREFIX + "device_name"
    PRECISION = PREFIX + "precision"  # bf16, tf32 or fp32
    VERSION = PREFIX + "version"
    TORCH = PREFIX + "torch"
    # how a run ended (Status values), and why
    STATUS = PREFIX + "status"
    REASON = PREFIX + "reason"
    EPOCHS_COMPLETED = PREFIX + "epochs_completed"
    DEAD_CLASSES = PREFIX + "dead_classes"  # comma list of class channels with no positive score on validation
    CHECKPOINT_LAST_EPOCH = PREFIX + "checkpoint_last_epoch"  # epoch of the uploaded checkpoints/last.pt
    CHECKPOINT_BEST_EPOCH = PREFIX + "checkpoint_best_epoch"
    CHECKPOINT_PROBLEM = PREFIX + "checkpoint_problem"  # a resume checkpoint was unusable: trained from scratch
    RESUMED_FROM_RUN = PREFIX + "resumed_from_run"  # a new run that started from another run's checkpoint
    RESUMED_FROM_EPOCH = PREFIX + "resumed_from_epoch"
    # collapse restarts: each attempt is its own run, linked both ways
    ATTEMPT = PREFIX + "attempt"  # 1, 2, ...
    INIT_SEED = PREFIX + "init_seed"
    COLLAPSE_RETRY_OF = PREFIX + "collapse_retry_of"
    COLLAPSE_RETRIED_BY = PREFIX + "collapse_retried_by"
    # a study (its parent run) and its trials
    STUDY_NAME = PREFIX + "study_name"
    STUDY_UID = PREFIX + "study_uid"
    STUDY_STATE = PREFIX + "study_state"  # StudyState values
    STORAGE = PREFIX + "storage"  # the Optuna storage URL, secrets removed
    SPACE = PREFIX + "space"
    SPACE_SHA = PREFIX + "space_sha"
    SAMPLER = PREFIX + "sampler"
    PRUNER = PREFIX + "pruner"
    TARGET_TRIALS = PREFIX + "target_trials"
    BEST_TRIAL = PREFIX + "best_trial"  # on the parent: the best trial's number; on a final run: the trial it retrains
    BEST_RUN_ID = PREFIX + "best_run_id"
    FINAL_RUN_ID = PREFIX + "final_run_id"
    TRIAL_NUMBER = PREFIX + "trial_number"
    TRIAL_STATE = PREFIX + "trial_state"  # trial_state_name(): complete, pruned, failed, running; restarted
    SAMPLED = PREFIX + "sampled"  # JSON of the trial's sampled params
    WORKER = PREFIX + "worker"  # host:pid that trained it
    RETRY_OF = PREFIX + "retry_of"  # the trial number this trial retries (worker lost, interrupted, store down)
    RETRIED_AS = PREFIX + "retried_as"  # on a lost trial's run: the run of its retry
    SOURCE_RUN = PREFIX + "source_run"  # on a final run: the trial run whose config it retrains
    # allconv reproduce
    KIND = PREFIX + "kind"  # reproduce
    PROTOCOL = PREFIX + "protocol"  # paper or validated
    LRS = PREFIX + "lrs"  # comma list of the grid's learning rates


BEST_PARAM_PREFIX = "best."  # parent-run tags best.<field> = the best trial's value of each searched field


class MlflowTag:
    """MLflow's own tags that allconv sets."""

    PARENT_RUN_ID = "mlflow.parentRunId"
    NOTE = "mlflow.note.content"  # the run's description
    GIT_COMMIT = "mlflow.source.git.commit"
    EXPERIMENT_KIND = "mlflow.experimentKind"


EXPERIMENT_KIND = "custom_model_development"  # MLflow's UI then opens the experiment on its runs, not GenAI traces


class Role(StrEnum):
    """Values of :attr:`Tag.ROLE`."""

    STUDY = "study"
    TRIAL = "trial"
    FINAL = "final"


class Kind(StrEnum):
    """Values of :attr:`Tag.KIND`."""

    REPRODUCE = "reproduce"


OLD_KILLED = "killed"  # the status tag of runs killed before Status existed (read as interrupted)


class Metric:
    """MLflow metric names. The per-epoch ones are the fields of ``engine.EpochMetrics`` (a test checks it)."""

    # per epoch (step = epoch)
    TRAIN_LOSS = "train_loss"
    TRAIN_ACCURACY = "train_accuracy"
    VAL_LOSS = "val_loss"
    VAL_ACCURACY = "val_accuracy"
    TEST_LOSS = "test_loss"
    TEST_ACCURACY = "test_accuracy"  # also the final one, at the last epoch
    LR = "lr"
    EPOCH_SECONDS = "epoch_seconds"
    IMAGES_PER_SECOND = "images_per_second"
    ALIVE_CLASSES = "alive_classes"
    # at the end of a run
    TEST_ERROR = "test_error"  # percent, as Table 3 prints it
    FINAL_VAL_ACCURACY = "final_val_accuracy"
    BEST_VAL_ACCURACY = "best_val_accuracy"  # also on a study's parent run: the best trial's value
    MEAN_IMAGES_PER_SECOND = "mean_images_per_second"
    TOTAL_SECONDS = "total_seconds"
    # on a study's parent run
    N_COMPLETE = "n_complete"
    N_PRUNED = "n_pruned"
    N_FAILED = "n_failed"
    BEST_TRIAL_TEST_ACCURACY = "best_trial_test_accuracy"
    BEST_TRIAL_TEST_ERROR = "best_trial_test_error"
    FINAL_TEST_ACCURACY = "final_test_accuracy"
    FINAL_TEST_ERROR = "final_test_error"
    PAPER_TEST_ERROR = "paper_test_error"
    PAPER_2020_TEST_ERROR = "paper_2020_test_error"


EPOCH_METRICS = (Metric.TRAIN_LOSS, Metric.TRAIN_ACCURACY, Metric.VAL_LOSS, Metric.VAL_ACCURACY, Metric.TEST_LOSS,
                 Metric.TEST_ACCURACY, Metric.LR, Metric.EPOCH_SECONDS, Metric.IMAGES_PER_SECOND,
                 Metric.ALIVE_CLASSES)


class Param:
    """MLflow params beyond the TrainConfig fields (which are logged under their own names)."""

    LR_MILESTONES = "lr_milestones"  # the schedule actually used
    OBJECTIVE = "objective"  # on a study's parent run


class Artifact:
    """Paths inside a run's artifacts."""

    CHECKPOINTS = "checkpoints"  # last.pt, best.pt
    MODEL = "model"  # pyfunc: raw uint8 images in, probabilities out
    NETWORK = "network"  # the bare torch network (weights: checkpoints)
    SPACE = "space.yaml"  # on a study's parent run
    SUMMARY = "summary"  # best_params.json, trials.csv, plots


class StudyAttr:
    """Optuna study user attributes."""

    PARENT_RUN_ID = PREFIX + "parent_run_id"
    STUDY_UID = PREFIX + "study_uid"
    SPACE = PREFIX + "space"
    BASE_CONFIG = PREFIX + "base_config"
    SPACE_SHA = PREFIX + "space_sha"  # written last: its presence means the identity is complete


class TrialAttr:
    """Optuna trial user attributes."""

    MLFLOW_RUN_ID = "mlflow_run_id"  # the trial's run: a retry resumes from its last checkpoint
    REASON = "reason"  # why it ended as it did
    WORKER = "worker"
    RETRY_OF = "retry_of"
    # a trial with one of these was never trained: FAIL in Optuna, takes no place among --trials
    SURPLUS = PREFIX + "surplus"  # True: the study already had --trials trials when it was created
    DUPLICATE_OF = PREFIX + "duplicate_of"  # the number of the trial whose sampled values it repeats
    USER_ERROR = PREFIX + "user_error"  # True: the user's input made it fail; the search stopped
    SKIP_MARKS = (SURPLUS, DUPLICATE_OF, USER_ERROR)


class Status(StrEnum):
    """How a training run stands or ended: the ``allconv.status`` tag, ``TrainResult.status`` and the terminal.

    The one status type. Its mapping to MLflow's run status and to Optuna's trial state is here and nowhere else.
    """

    RUNNING = "running"
    FINISHED = "finished"
    PRUNED = "pruned"  # stopped by the pruner
    DIVERGED = "diverged"  # the loss became NaN/inf
    COLLAPSED = "collapsed"  # dead ReLUs: constant output or every class channel dead; it cannot recover
    INTERRUPTED = "interrupted"  # Ctrl-C or a stop signal; resumable from its last checkpoint
    FAILED = "failed"  # an exception (a crash, a lost worker)

    @property
    def mlflow(self) -> str:
        """MLflow's run status (RUNNING, FINISHED, FAILED, KILLED)."""
        return _MLFLOW[self]

    @property
    def optuna(self) -> str:
        """The name of the Optuna TrialState a trial that ended so is told: diverged and collapsed runs are PRUNED
        (TPE then learns the region is bad instead of ignoring it), an interrupted one FAIL (and re-queued)."""
        return _OPTUNA[self]


_MLFLOW = {Status.RUNNING: "RUNNING", Status.FINISHED: "FINISHED", Status.PRUNED: "FINISHED",
           Status.DIVERGED: "FAILED", Status.COLLAPSED: "FAILED", Status.INTERRUPTED: "KILLED",
           Status.FAILED: "FAILED"}
_OPTUNA = {Status.RUNNING: "RUNNING", Status.FINISHED: "COMPLETE", Status.PRUNED: "PRUNED",
           Status.DIVERGED: "PRUNED", Status.COLLAPSED: "PRUNED", Status.INTERRUPTED: "FAIL", Status.FAILED: "FAIL"}

RESTARTED = "restarted"  # trial_state of a trial's run that collapsed and was followed by a new attempt


def trial_state_name(optuna_state: str) -> str:
    """How an Optuna TrialState name reads in the ``allconv.trial_state`` tag and the terminal."""
    return {"COMPLETE": "complete", "FAIL": "failed"}.get(optuna_state, optuna_state.lower())


class StudyState(StrEnum):
    """The ``allconv.study_state`` tag of a study's parent run, and how a study session ended."""

    RUNNING = "running"
    COMPLETE = "complete"  # --trials trials finished
    TIMEOUT = "timeout"  # --timeout passed before that: rerunning adds the rest
    PENDING = "pending"  # the remaining trials are running in other processes
    INTERRUPTED = "interrupted"
    EXHAUSTED = "exhausted"  # the space has no untried configuration left
    FAILED = "failed"

    @property
    def mlflow(self) -> str:
        """The parent run's MLflow status for a session that ended so."""
        return {StudyState.INTERRUPTED: "KILLED", StudyState.FAILED: "FAILED",
                StudyState.RUNNING: "RUNNING"}.get(self, "FINISHED")
