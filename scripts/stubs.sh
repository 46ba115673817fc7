#!/usr/bin/env bash
# Generates Go and Java stubs for proto/normserve/v1/normserve.proto with
# Debian's gRPC packages and builds one smoke program per language
# (client/go/smoke, client/java/Smoke.java), offline:
#
#   BUILD_DIR/stubs/go/src/normserve/v1/   Go package normservev1, import
#                                          path "normserve/v1" (GOPATH mode)
#   BUILD_DIR/stubs/go/smoke               the Go smoke program
#   BUILD_DIR/stubs/java/src/normserve/v1/ Java package normserve.v1
#   BUILD_DIR/stubs/java/classes/          the compiled stubs and Smoke
#   BUILD_DIR/stubs/java/classpath         the runtime classpath (one line)
#   BUILD_DIR/stubs/java/smoke             runs Smoke on that classpath
#
# usage: scripts/stubs.sh BUILD_DIR
# Idempotent; quiet on success. A missing tool names its Debian package
# (scripts/install-deps.sh installs them all).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: scripts/stubs.sh BUILD_DIR" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
STUBS=$(cd "$1" && pwd)/stubs
PROTO=normserve/v1/normserve.proto
GOCODE=/usr/share/gocode
JARS=/usr/share/java

die() {
  echo "stubs: $*" >&2
  exit 1
}
need_tool() {  # TOOL PACKAGE
  command -v "$1" >/dev/null 2>&1 ||
    die "$1 not found; install Debian package $2 (scripts/install-deps.sh)"
}
need_path() {  # PATH PACKAGE
  [[ -e $1 ]] ||
    die "$1 not found; install Debian package $2 (scripts/install-deps.sh)"
}
# Runs a command with its output kept in LOG, shown only when it fails.
quiet() {  # LOG COMMAND...
  local log=$1
  shift
  if "$@" >"$log" 2>&1; then
    rm -f "$log"
  else
    cat "$log" >&2
    die "failed: $*"
  fi
}

need_tool protoc protobuf-compiler
need_tool protoc-gen-go protoc-gen-go
need_tool protoc-gen-go-grpc protoc-gen-go-grpc
need_tool go golang-go
need_tool grpc_java_plugin protobuf-compiler-grpc-java-plugin
need_tool javac default-jdk-headless
need_tool java default-jdk-headless
need_path $GOCODE/src/google.golang.org/grpc golang-google-grpc-dev
need_path $GOCODE/src/google.golang.org/protobuf golang-google-protobuf-dev
need_path $GOCODE/src/github.com/golang/protobuf/proto \
  golang-github-golang-protobuf-1-5-dev
# 1.3 (golang-google-grpc-dev's default) marshals protoc-gen-go's messages
# through its own tables and crashes on their oneofs.
if [[ -e $GOCODE/src/github.com/golang/protobuf/proto/table_marshal.go ]]; then
  die "github.com/golang/protobuf is 1.3; install Debian package" \
    "golang-github-golang-protobuf-1-5-dev (scripts/install-deps.sh)"
fi

# The jars of grpc-java's netty transport (Debian has no grpc-okhttp) and
# their dependencies, each with the Debian package that has it.
JAVA_JARS=(
  grpc-api:libgrpc-java grpc-context:libgrpc-java grpc-core:libgrpc-java
  grpc-stub:libgrpc-java grpc-protobuf:libgrpc-java
  grpc-protobuf-lite:libgrpc-java grpc-netty:libgrpc-java
  protobuf:libprotobuf-java guava:libguava-java
  perfmark-api:libperfmark-java gson:libgoogle-gson-java
  netty-common:libnetty-java netty-buffer:libnetty-java
  netty-resolver:libnetty-java netty-transport:libnetty-java
  netty-codec:libnetty-java netty-codec-http:libnetty-java
  netty-codec-http2:libnetty-java netty-handler:libnetty-java
)
CLASSPATH_JARS=""
for entry in "${JAVA_JARS[@]}"; do
  jar=$JARS/${entry%%:*}.jar
  need_path "$jar" "${entry#*:}"
  CLASSPATH_JARS+=${CLASSPATH_JARS:+:}$jar
done
# The generated stubs carry @javax.annotation.Generated (compile time only).
ANNOTATION_JAR=$JARS/geronimo-annotation-1.3-spec.jar
need_path "$ANNOTATION_JAR" libgeronimo-annotation-1.3-spec-java

# Go: the stubs in a GOPATH of their own, Debian's sources after it.
GO_DIR=$STUBS/go
rm -rf "$GO_DIR/src"
mkdir -p "$GO_DIR/src" "$GO_DIR/cache"
GO_MAP="M$PROTO=normserve/v1;normservev1"
quiet "$GO_DIR/protoc.log" protoc -I "$ROOT/proto" \
  --go_out="$GO_DIR/src" --go_opt="$GO_MAP" \
  --go-grpc_out="$GO_DIR/src" --go-grpc_opt="$GO_MAP" "$PROTO"
(
  cd "$ROOT"
  export GO111MODULE=off GOPATH="$GO_DIR:$GOCODE" GOCACHE="$GO_DIR/cache"
  export GOFLAGS="" GOPROXY=off CGO_ENABLED=0
  quiet "$GO_DIR/build.log" go build -o "$GO_DIR/smoke" ./client/go/smoke
)

# Java: the stubs and Smoke compiled together; `smoke` runs it.
JAVA_DIR=$STUBS/java
rm -rf "$JAVA_DIR/src" "$JAVA_DIR/classes"
mkdir -p "$JAVA_DIR/src" "$JAVA_DIR/classes"
quiet "$JAVA_DIR/protoc.log" protoc -I "$ROOT/proto" \
  --java_out="$JAVA_DIR/src" \
  --plugin=protoc-gen-grpc-java="$(command -v grpc_java_plugin)" \
  --grpc-java_out="$JAVA_DIR/src" "$PROTO"
mapfile -t JAVA_SOURCES < <(find "$JAVA_DIR/src" -name '*.java' | sort)
quiet "$JAVA_DIR/javac.log" javac -nowarn -encoding UTF-8 \
  -d "$JAVA_DIR/classes" -cp "$CLASSPATH_JARS:$ANNOTATION_JAR" \
  "${JAVA_SOURCES[@]}" "$ROOT/client/java/Smoke.java"
echo "$JAVA_DIR/classes:$CLASSPATH_JARS" >"$JAVA_DIR/classpath"
cat >"$JAVA_DIR/smoke" <<EOF
#!/bin/sh
# Runs client/java/Smoke.java (built by scripts/stubs.sh).
exec java -cp "\$(cat "\$(dirname "\$0")/classpath")" Smoke "\$@"
EOF
chmod +x "$JAVA_DIR/smoke"
