// normserve's command-line flags. Each is declared once, with ABSL_FLAG in
// flags.cc: its help text is its documentation, and `normserve --help` is
// generated from the declarations.
#pragma once

#include "absl/time/time.h"
#include "server/grpc/server.h"

namespace normserve::server {

// Sets the flags from argv[1..]: `--flag value` or `--flag=value`, for the
// flags flags.cc declares and no others (the libraries' flags are not
// settable). Each value is checked as it is parsed (ranges, --fsync's
// words). --help (or -h) prints the usage text, --helpfull also the flags
// of the libraries linked in; both exit 0. An unknown flag, a missing value
// or a bad one prints "normserve: ..." to stderr and exits 2.
void ParseFlags(int argc, char** argv);

// The server's options from the flags (sizes in MiB become bytes).
ServerOptions ServerOptionsFromFlags();

// --shutdown_grace_s: on SIGTERM/SIGINT, how long in-flight calls have.
absl::Duration ShutdownGraceFromFlags();

}  // namespace normserve::server
