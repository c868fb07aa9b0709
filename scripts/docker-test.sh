#!/usr/bin/env bash
# `make docker-test`: the Dockerfile and docker-compose.yml that users get, built and run for real on this machine.
#
#  1. An engine: the Docker daemon that answers, or `dockerd` started here (as root) and stopped at the end. Where no
#     engine can run, the test is skipped: exit 0 and the reason on one line.
#  2. Local base images, built once and reused while their recipe is unchanged (label allconv.recipe), since no image
#     registry needs to be reachable: Debian bookworm from debootstrap, a stand-in for the official PyTorch base
#     (tests/docker/torch-base.Dockerfile: the pinned torch/torchvision from PyPI; they run on CPU) and a PostgreSQL
#     stand-in (tests/docker/postgres.Dockerfile).
#  3. The project image from the same Dockerfile users build, with --build-arg BASE_IMAGE=<the torch stand-in>.
#  4. Runs: --version, models, a fake-data train as uid 1000 into a mounted folder (then its MLflow run there), one as
#     another uid stopped by `docker stop` mid-training, and a read-only mount (one line, exit 2).
#  5. The compose stack (postgres, mlflow with basic auth, mlflow-user, prepare, 3 x worker-cpu;
#     tests/docker/compose.test.yml) on a 6-trial fake-data study, checked through the MLflow server and PostgreSQL
#     (tests/docker/check_study.py); compose refusing a missing secret; the UI published on 127.0.0.1 only, refusing
#     requests without credentials; no secret on a command line; a worker with a user error; a worker stopped
#     mid-trial; then `down -v`.
#
# Settings: DOCKER_TEST_KEEP=1 keeps the stack, containers and folders after a failure; DEBIAN_MIRROR;
# DOCKER_TEST_DEBIAN_IMAGE: an existing Debian bookworm image instead of debootstrap (e.g. debian:bookworm where a
# registry is reachable). Pip in the test builds uses the host's http(s) PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, proxy
# variables, and trusts the host's CA bundle (test images only; never the project's Dockerfile).
set -eEuo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PREFIX=allconv-test
IMAGE=$PREFIX/allconv:latest
TORCH_PIN=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
TORCHVISION_PIN=$(sed -n 's/^ *"torchvision==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_IMAGE=$PREFIX/torch:$TORCH_PIN
POSTGRES_IMAGE=$PREFIX/postgres:15
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${DOCKER_TEST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PROJECT=allconv-dtest-$$
export DOCKER_BUILDKIT=0  # the classic builder: no buildx needed, and its cache is images we can prune by label

STARTED=$(date +%s)
TIMES=""
DOCKERD_PID=""
STACK_UP=""
CONTAINERS=()
SCRATCH=""
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/docker-test-logs.XXXXXX")
OK=""

say() { printf 'docker-test: %s\n' "$*"; }
skip() { say "SKIPPED: $*"; OK=skipped; exit 0; }
fail() { say "FAILED: $*"; exit 1; }
since() { echo $(( $(date +%s) - $1 )); }
timed() { TIMES="$TIMES, $1 $2s${3:+ ($3)}"; }
show_log() { tail -n "${2:-25}" "$1" | sed 's/^/    | /'; }

# ---------------------------------------------------------------------------------------------------------------
# cleanup: only what this run made

compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml -f tests/docker/compose.test.yml \
    --profile cpu "$@"; }

cleanup() {
    local code=$?
    set +e
    trap - ERR
    if [ -n "$OK" ] || [ -z "${DOCKER_TEST_KEEP:-}" ]; then
        if [ -n "$STACK_UP" ]; then
            compose logs --no-color > "$LOGS/compose.log" 2>&1
            compose down -v --remove-orphans -t 60 > /dev/null 2>&1
        fi
        for c in "${CONTAINERS[@]}"; do docker rm -f -v "$c" > /dev/null 2>&1; done
        if [ -n "$SCRATCH" ] && [ -d "$SCRATCH" ]; then  # files of uid 1000/4242: removed by a root container
            docker run --rm --user 0 -v "$SCRATCH:/scratch" --entrypoint sh "$IMAGE" -c 'rm -rf /scratch/*' \
                > /dev/null 2>&1
            rm -rf "$SCRATCH"
        fi
        docker image prune -f --filter label=allconv.test=1 > /dev/null 2>&1
        # anonymous /work volumes of containers that compose replaced or scaled away (the image declares the volume)
        for v in $(docker volume ls -q --filter dangling=true 2> /dev/null); do
            grep -q -x -F "$v" "$LOGS/volumes-before" 2> /dev/null || docker volume rm "$v" > /dev/null 2>&1
        done
    else
        say "kept for inspection (DOCKER_TEST_KEEP): project $PROJECT, folders $SCRATCH"
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2> /dev/null
        for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2> /dev/null || break; sleep 0.5; done
        kill -9 "$DOCKERD_PID" 2> /dev/null
        say "stopped the dockerd this test started (pid $DOCKERD_PID)"
    fi
    [ "$OK" = passed ] || [ -z "$TIMES" ] || say "times: ${TIMES#, }"
    if [ "$OK" = passed ] || [ "$OK" = skipped ]; then
        rm -rf "$LOGS"
    else
        say "logs: $LOGS"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'say "FAILED at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------------------------------------------------------
# 1. the engine

t=$(date +%s)
command -v docker > /dev/null || skip "no docker command here (Debian: apt-get install docker.io docker-compose debootstrap)"
if ! docker info > "$LOGS/docker-info.log" 2>&1; then
    if [ "$(id -u)" -ne 0 ] || ! command -v dockerd > /dev/null; then
        skip "no Docker daemon answers ($(grep -m1 -i -E 'error|cannot|denied' "$LOGS/docker-info.log" || echo no reply)), and dockerd cannot be started here (needs root and the docker.io package)"
    fi
    dockerd > "$LOGS/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info > /dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2> /dev/null || break
        sleep 0.5
    done
    if ! docker info > /dev/null 2>&1; then
        reason=$(grep -i -E 'level=(fatal|error)' "$LOGS/dockerd.log" | tail -1 | sed 's/.*msg="\([^"]*\)".*/\1/')
        skip "dockerd cannot run on this machine: ${reason:-no reply within 30 s}"
    fi
    say "started dockerd (pid $DOCKERD_PID)"
fi
if docker compose version > /dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose > /dev/null; then
    COMPOSE=(docker-compose)
else
    fail "no Docker Compose (Compose v2 plugin or docker-compose; Debian: apt-get install docker-compose)"
fi
docker volume ls -q --filter dangling=true > "$LOGS/volumes-before"
say "engine: Docker $(docker version -f '{{.Server.Version}}'), $("${COMPOSE[@]}" version --short 2>/dev/null || echo compose)"
timed engine "$(since "$t")"

# ---------------------------------------------------------------------------------------------------------------
# 2. base images (cached)

label_of() { docker image inspect -f "{{ index .Config.Labels \"allconv.recipe\" }}" "$1" 2> /dev/null || true; }
hash_of() { sha256sum | cut -c1-16; }

# Build args that let pip reach the package index from inside a build (not stored in the image for the proxy ones).
net_args() {
    local v
    for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        if [ -n "${!v:-}" ]; then printf -- '--build-arg\n%s=%s\n' "$v" "${!v}"; fi
    done
}
pip_setting() {  # an http(s) index setting of the host's pip, from the environment or its config
    local value="${!1:-}"
    if [ -z "$value" ] && command -v pip3 > /dev/null; then value=$(pip3 config get "global.$2" 2> /dev/null || true); fi
    printf '%s' "$value" | tr ' ' '\n' | { grep -E '^https?://' || true; } | tr '\n' ' ' | sed 's/ $//'
}

t=$(date +%s)
DEBIAN_IMAGE=${DOCKER_TEST_DEBIAN_IMAGE:-}
if [ -z "$DEBIAN_IMAGE" ]; then
    DEBIAN_IMAGE=$PREFIX/debian:bookworm
    recipe=$(echo "debootstrap --variant=minbase bookworm $DEBIAN_MIRROR" | hash_of)
    if [ "$(label_of "$DEBIAN_IMAGE")" != "$recipe" ]; then
        command -v debootstrap > /dev/null && [ "$(id -u)" -eq 0 ] \
            || fail "the Debian base is made once with debootstrap, as root (apt-get install debootstrap), or set DOCKER_TEST_DEBIAN_IMAGE"
        say "building $DEBIAN_IMAGE (debootstrap, once)"
        rootfs=$(mktemp -d /var/tmp/docker-test-rootfs.XXXXXX)
        if ! debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" > "$LOGS/debootstrap.log" 2>&1; then
            show_log "$LOGS/debootstrap.log"; rm -rf "$rootfs"; fail "debootstrap failed"
        fi
        tar -C "$rootfs" -c . | docker import -c "LABEL allconv.test=1" -c "LABEL allconv.recipe=$recipe" - \
            "$DEBIAN_IMAGE" > /dev/null
        rm -rf "$rootfs"
    fi
fi
debian_id=$(docker image inspect -f '{{.Id}}' "$DEBIAN_IMAGE") || fail "no image $DEBIAN_IMAGE"

# build_base IMAGE DOCKERFILE CONTEXT [build args...]: rebuilt only when the recipe (Dockerfile, context, args and
# the Debian image) changed.
build_base() {
    local image=$1 dockerfile=$2 context=$3; shift 3
    local recipe
    recipe=$( (cat "$dockerfile"; tar -C "$context" -c --sort=name --mtime=@0 --owner=0 --group=0 . ; \
               echo "$debian_id $*") | hash_of)
    if [ "$(label_of "$image")" = "$recipe" ]; then
        say "reusing $image (recipe $recipe)"
        return 0
    fi
    say "building $image (once per recipe)"
    local started; started=$(date +%s)
    if ! docker build --force-rm -f "$dockerfile" --build-arg "DEBIAN_IMAGE=$debian_id" "$@" \
            --label allconv.test=1 --label "allconv.recipe=$recipe" -t "$image" "$context" \
            > "$LOGS/build-$(basename "$dockerfile").log" 2>&1; then
        show_log "$LOGS/build-$(basename "$dockerfile").log"; fail "building $image failed"
    fi
    say "built $image in $(since "$started")s"
}

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/docker-test.XXXXXX")
mkdir -p "$SCRATCH/torch-context" "$SCRATCH/postgres-context"
[ -s "$CA_BUNDLE" ] || fail "no CA bundle at $CA_BUNDLE (set DOCKER_TEST_CA_BUNDLE)"
cp "$CA_BUNDLE" "$SCRATCH/torch-context/host-ca.crt"
cp tests/docker/postgres-entrypoint.sh "$SCRATCH/postgres-context/"
mapfile -t NET < <(net_args)
INDEX=$(pip_setting PIP_INDEX_URL index-url)
EXTRA_INDEX=$(pip_setting PIP_EXTRA_INDEX_URL extra-index-url)
build_base "$POSTGRES_IMAGE" tests/docker/postgres.Dockerfile "$SCRATCH/postgres-context" "${NET[@]}" &
postgres_build=$!
build_base "$TORCH_IMAGE" tests/docker/torch-base.Dockerfile "$SCRATCH/torch-context" "${NET[@]}" \
    --build-arg "TORCH_VERSION=$TORCH_PIN" --build-arg "TORCHVISION_VERSION=$TORCHVISION_PIN" \
    --build-arg "PIP_INDEX_URL=$INDEX" --build-arg "PIP_EXTRA_INDEX_URL=$EXTRA_INDEX"
wait "$postgres_build" || fail "the PostgreSQL stand-in was not built"
timed bases "$(since "$t")"

# ---------------------------------------------------------------------------------------------------------------
# 3. the project image, from the users' Dockerfile

t=$(date +%s)
if ! docker build --force-rm --build-arg "BASE_IMAGE=$TORCH_IMAGE" "${NET[@]}" --label allconv.test=1 -t "$IMAGE" . \
        > "$LOGS/build-image.log" 2>&1; then
    show_log "$LOGS/build-image.log" 40; fail "the project image did not build on $TORCH_IMAGE"
fi
docker image prune -f --filter label=allconv.test=1 > /dev/null
size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }
say "built $IMAGE in $(since "$t")s: $(size "$IMAGE") ($(size "$TORCH_IMAGE") of it the torch stand-in)"
timed image "$(since "$t")"

# ---------------------------------------------------------------------------------------------------------------
# 4. the image, run

t=$(date +%s)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
out=$(docker run --rm "$IMAGE" --version)
[ "$out" = "allconv, version $version" ] || fail "--version printed '$out'"
networks=$(docker run --rm "$IMAGE" models --format json | grep -c '"name"' || true)
[ "$networks" -ge 12 ] || fail "allconv models listed $networks networks, expected 12"
say "ok   --version ($out) and models ($networks networks)"

# folder_for UID: an empty folder owned by that uid (chowned by a root container: works without host root too)
folder_for() {
    local dir="$SCRATCH/$2"
    mkdir -p "$dir"
    docker run --rm --user 0 -v "$dir:/d" --entrypoint chown "$IMAGE" "$1:$1" /d
    echo "$dir"
}
TRAIN=(train --model A --branch strided --dataset fake --preprocess standardize --device cpu --val-size 100
       --test-size 100)
train_dir=$(folder_for 1000 train-1000)
stop_dir=$(folder_for 4242 stop-4242)
c_train=$PROJECT-train
c_stop=$PROJECT-stop
CONTAINERS+=("$c_train" "$c_stop")
docker run -d --name "$c_train" --user 1000:1000 -e ALLCONV_FAKE_SIZES=300,100 -v "$train_dir:/work" "$IMAGE" \
    "${TRAIN[@]}" --subset 200 --epochs 1 > /dev/null
# Another uid (as with `--user "$(id -u):$(id -g)"`), many epochs: stopped by `docker stop` once an epoch is saved.
docker run -d --name "$c_stop" --user 4242:4242 -e ALLCONV_FAKE_SIZES=1000,100 -v "$stop_dir:/work" "$IMAGE" \
    "${TRAIN[@]}" --subset 800 --epochs 30 > /dev/null
code=$(docker wait "$c_train")
docker logs "$c_train" > "$LOGS/train.log" 2>&1
[ "$code" = 0 ] || { show_log "$LOGS/train.log"; fail "allconv train as uid 1000 exited with $code"; }
if grep -q -E "GitPython|Failed to import Git" "$LOGS/train.log"; then
    show_log "$LOGS/train.log"; fail "the train output has GitPython's warning"
fi
owners=$(find "$train_dir" -mindepth 1 -printf '%U\n' | sort -u | tr '\n' ' ')
[ "$owners" = "1000 " ] || fail "files in the mounted folder belong to '$owners', expected uid 1000 only"
# check_run USER FOLDER STATUS...: the MLflow runs in FOLDER, read in a container as USER
check_run() {
    local user=$1 dir=$2; shift 2
    local code=0
    docker run --rm --user "$user" -v "$dir:/work" -v "$ROOT/tests/docker:/checks:ro" --entrypoint python "$IMAGE" \
        /checks/check_run.py "$@" > "$LOGS/check-run.log" 2>&1 || code=$?
    grep -v ' INFO ' "$LOGS/check-run.log" | sed 's/^/    /' || true
    return "$code"
}
check_run 1000:1000 "$train_dir" FINISHED || fail "the MLflow run in the mounted folder is not as expected"
say "ok   train as uid 1000 into a mounted folder: MLflow run finished there, files owned by uid 1000"

for _ in $(seq 1 300); do
    [ -n "$(find "$stop_dir" -path '*checkpoints/last.pt' 2> /dev/null | head -1)" ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$c_stop")" = true ] || break
    sleep 1
done
s=$(date +%s.%N)
docker stop -t 60 "$c_stop" > /dev/null
stop_s=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $s}")
code=$(docker inspect -f '{{.State.ExitCode}}' "$c_stop")
docker logs "$c_stop" > "$LOGS/stop.log" 2>&1
[ "$code" = 130 ] || { show_log "$LOGS/stop.log"; fail "docker stop mid-training: exit $code, expected 130 (interrupted)"; }
awk "BEGIN {exit !($stop_s < 30)}" || fail "docker stop took ${stop_s}s (the stop signal was not acted on)"
check_run 4242:4242 "$stop_dir" KILLED || fail "the interrupted run is not recorded as KILLED with its checkpoint"
say "ok   uid 4242, docker stop mid-training: stopped in ${stop_s}s, exit 130, run KILLED with its last checkpoint"

ro_dir=$(folder_for 1000 read-only)
s=$(date +%s)
code=0
docker run --rm -e ALLCONV_FAKE_SIZES=300,100 -v "$ro_dir:/work:ro" "$IMAGE" "${TRAIN[@]}" --subset 200 --epochs 1 \
    > "$LOGS/read-only.log" 2>&1 || code=$?
lines=$(grep -c -v -E '^\s*$' "$LOGS/read-only.log" || true)
if [ "$code" != 2 ] || [ "$lines" != 1 ] || ! grep -q '^Error: ' "$LOGS/read-only.log"; then
    show_log "$LOGS/read-only.log" 8
    fail "a read-only /work: exit $code with $lines lines after $(since "$s")s, expected one 'Error:' line and exit 2"
fi
[ -z "$(ls -A "$ro_dir")" ] || fail "the read-only run left files"
say "ok   read-only /work: exit 2 in $(since "$s")s: $(grep -v -E '^\s*$' "$LOGS/read-only.log")"
timed runs "$(since "$t")"

# ---------------------------------------------------------------------------------------------------------------
# 5. the compose stack

t=$(date +%s)
export DOCKER_TEST_IMAGE=$IMAGE DOCKER_TEST_POSTGRES_IMAGE=$POSTGRES_IMAGE
secret() { printf '%s-%s' "$1" "$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"; }
SECRET_NAMES=(POSTGRES_PASSWORD MLFLOW_ADMIN_PASSWORD MLFLOW_WORKER_PASSWORD MLFLOW_SECRET_KEY)
POSTGRES_PASSWORD=$(secret pg) MLFLOW_ADMIN_PASSWORD=$(secret admin) MLFLOW_WORKER_PASSWORD=$(secret worker)
MLFLOW_SECRET_KEY=$(secret key)
export "${SECRET_NAMES[@]}" MLFLOW_PORT=0 STUDY=docker-test TRIALS=6 EPOCHS=1
compose config -q || fail "docker-compose.yml + tests/docker/compose.test.yml are not valid for ${COMPOSE[*]}"
(unset DOCKER_TEST_IMAGE DOCKER_TEST_POSTGRES_IMAGE; "${COMPOSE[@]}" -f docker-compose.yml config -q) \
    || fail "docker-compose.yml alone is not valid for ${COMPOSE[*]}"
for name in "${SECRET_NAMES[@]}"; do  # no silent default: compose stops, naming the missing secret
    if out=$( (unset "$name"; "${COMPOSE[@]}" -f docker-compose.yml config -q) 2>&1 ); then
        fail "compose accepts docker-compose.yml without $name"
    fi
    grep -q -F "set $name" <<< "$out" || fail "compose without $name said '$out', not naming it"
done
say "ok   compose refuses the file without any one of ${SECRET_NAMES[*]}, naming it"
STACK_UP=1
compose up -d --no-build --scale worker-cpu=3 postgres mlflow worker-cpu > "$LOGS/compose-up.log" 2>&1 \
    || { show_log "$LOGS/compose-up.log"; fail "compose up failed"; }
up_s=$(since "$t")
published=$(compose port mlflow 5000)
mlflow_port=${published##*:}
[ "${published%:*}" = 127.0.0.1 ] || fail "the MLflow UI is published on '$published', expected 127.0.0.1 only"
host_ip=$(hostname -I 2> /dev/null | awk '{print $1}')
# From the host, through the published port (a few tries: the workers' start-up keeps the CPUs busy): /health open,
# the API only with a user's credentials, and nothing on the host's other addresses. The passwords reach the checking
# container by name (-e NAME), not on its command line.
docker run --rm --network host -e MLFLOW_ADMIN_PASSWORD -e MLFLOW_WORKER_PASSWORD --entrypoint python "$IMAGE" -c "if 1:
    import base64, os, socket, time, urllib.error, urllib.request
    base = 'http://127.0.0.1:$mlflow_port'
    def status(path, user=None, password=None):
        request = urllib.request.Request(base + path)
        if user:
            request.add_header('Authorization', 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
    for attempt in range(6):
        try:
            urllib.request.urlopen(base + '/health', timeout=15)
            break
        except OSError as exc:
            print(f'health check {attempt + 1}: {exc}')
            time.sleep(5)
    else:
        raise SystemExit(1)
    api = '/api/2.0/mlflow/experiments/search?max_results=1'
    got = {'no credentials': status(api), 'a wrong password': status(api, 'allconv', 'wrong-password-12'),
           'the workers user': status(api, 'allconv', os.environ['MLFLOW_WORKER_PASSWORD']),
           'the admin': status(api, 'admin', os.environ['MLFLOW_ADMIN_PASSWORD'])}
    print('    API answers:', got)
    if list(got.values()) != [401, 401, 200, 200]:
        raise SystemExit('expected 401, 401, 200, 200')
    if '$host_ip':
        try:
            socket.create_connection(('$host_ip', $mlflow_port), timeout=5).close()
            raise SystemExit('the UI answers on $host_ip too')
        except OSError:
            print('    nothing listens on $host_ip:$mlflow_port')" || fail "the MLflow server's published port is not as expected"
for service in mlflow-user prepare; do
    c=$(docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$service" | head -1)
    [ -n "$c" ] && [ "$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$c")" = "exited 0" ] \
        || { docker logs "$c" 2>&1 | tail -5; fail "the one-shot $service did not exit 0"; }
done
say "ok   stack up in ${up_s}s (postgres, mlflow with basic auth on 127.0.0.1:$mlflow_port only: 401 without credentials, 200 with them; mlflow-user and prepare exited 0; 3 workers)"

mapfile -t workers < <(compose ps -q worker-cpu)
[ "${#workers[@]}" = 3 ] || fail "${#workers[@]} worker containers, expected 3"
for _ in $(seq 1 900); do
    running=0
    for w in "${workers[@]}"; do
        state=$(docker inspect -f '{{.State.Status}}' "$w")
        [ "$state" = exited ] || running=$((running + 1))
    done
    [ "$running" = 0 ] && break
    sleep 1
done
study_s=$(( $(since "$t") - up_s ))
codes=$(for w in "${workers[@]}"; do docker inspect -f '{{.State.ExitCode}}/{{.RestartCount}}' "$w"; done | tr '\n' ' ')
[ "$running" = 0 ] || fail "workers still running after 15 minutes"
say "workers done in ${study_s}s (exit code/restarts: $codes)"
for w in "${workers[@]}"; do
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$w")" = 0 ] \
        || { compose logs --no-color worker-cpu > "$LOGS/workers.log" 2>&1; show_log "$LOGS/workers.log" 30;
             fail "a worker exited with $(docker inspect -f '{{.State.ExitCode}}' "$w")"; }
done
# The secrets are in the services' environment, never on a command line (ps, /proc/*/cmdline, docker inspect's Args).
for c in $(docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT"); do
    args=$(docker inspect -f '{{.Path}} {{join .Args " "}}' "$c")
    running=$(docker inspect -f '{{.State.Running}}' "$c")
    procs=""
    [ "$running" != true ] || procs=$(docker exec "$c" sh -c 'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\0" " "')
    for name in "${SECRET_NAMES[@]}"; do
        if grep -q -F "${!name}" <<< "$args $procs"; then
            fail "$name is on a command line in $(docker inspect -f '{{.Name}}' "$c")"
        fi
    done
done
say "ok   no secret (${SECRET_NAMES[*]}) on a command line"

# check_study ARGS...: tests/docker/check_study.py in a container of the stack, with the workers' environment
check_study() {
    local code=0
    compose run --rm --no-deps -T -v "$ROOT/tests/docker:/checks:ro" --entrypoint python worker-cpu \
        /checks/check_study.py "$@" > "$LOGS/check-study.log" 2>&1 || code=$?
    grep -v -E ' INFO |^Creating |^[0-9]+$' "$LOGS/check-study.log" | sed 's/^/    /' || true
    return "$code"
}
study_ok=0
check_study "$STUDY" "$TRIALS" || study_ok=$?

# A user error (here --trials 0) in a worker: a few tries, then it stays down.
s=$(date +%s)
TRIALS=0 compose up -d --no-build --no-deps --scale worker-cpu=1 worker-cpu > "$LOGS/compose-bad.log" 2>&1 \
    || { show_log "$LOGS/compose-bad.log"; fail "compose up of a worker with a bad option failed"; }
bad=$(compose ps -q worker-cpu)
for _ in $(seq 1 120); do
    [ "$(docker inspect -f '{{.State.Status}}' "$bad")" = exited ] && \
        [ "$(docker inspect -f '{{.RestartCount}}' "$bad")" -ge 3 ] && break
    sleep 1
done
sleep 3
restarts=$(docker inspect -f '{{.RestartCount}}' "$bad")
state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$bad")
[ "$state" = "exited 2" ] && [ "$restarts" = 3 ] \
    || fail "a worker with a user error: state '$state' after $restarts restarts, expected 'exited 2' after 3"
say "ok   a worker with a user error: exit 2, restarted $restarts times, then down ($(since "$s")s): $(docker logs "$bad" 2>&1 | tail -1)"

# A worker stopped mid-trial: it acts on the stop signal (SIGINT through docker-init) and its trial is re-queued.
s=$(date +%s)
STUDY=docker-test-stop EPOCHS=40 compose run --rm --no-deps -T prepare > "$LOGS/compose-stop-prepare.log" 2>&1 \
    || { show_log "$LOGS/compose-stop-prepare.log"; fail "preparing the stop test's study failed"; }
STUDY=docker-test-stop EPOCHS=40 compose up -d --no-build --no-deps --scale worker-cpu=1 worker-cpu \
    > "$LOGS/compose-stop.log" 2>&1 || { show_log "$LOGS/compose-stop.log"; fail "compose up of the stop test failed"; }
w=$(compose ps -q worker-cpu)
for _ in $(seq 1 60); do
    n=$(docker exec -i "$w" python - --training docker-test-stop < tests/docker/check_study.py 2> /dev/null || true)
    [ "${n:-0}" -ge 1 ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$w")" = true ] || break
    sleep 3
done
[ "${n:-0}" -ge 1 ] || fail "the stop test's worker never reported an epoch"
s2=$(date +%s.%N)
compose stop -t 120 worker-cpu > /dev/null 2>&1
stop_s=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $s2}")
code=$(docker inspect -f '{{.State.ExitCode}}' "$w")
interrupted_ok=0
check_study --interrupted docker-test-stop || interrupted_ok=$?
[ "$interrupted_ok" = 0 ] && [ "$code" = 130 ] && awk "BEGIN {exit !($stop_s < 60)}" \
    || fail "a worker stopped mid-trial: exit $code after ${stop_s}s (grace period 120 s)"
say "ok   a worker stopped mid-trial: exit 130 in ${stop_s}s, its trial marked interrupted"

s=$(date +%s)
compose logs --no-color > "$LOGS/compose.log" 2>&1
compose down -v --remove-orphans -t 60 > "$LOGS/compose-down.log" 2>&1 || fail "compose down failed"
STACK_UP=""
down_s=$(since "$s")
left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
[ "$left" = 0 ] || fail "compose down -v left $left volumes"
say "ok   down -v in ${down_s}s, volumes removed"
timed compose "$(since "$t")" "study ${study_s}s"
[ "$study_ok" = 0 ] || fail "the compose study's checks failed (above)"

OK=passed
say "passed in $(since "$STARTED")s: ${TIMES#, }"
