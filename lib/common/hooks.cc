#include "parley/hooks.h"

namespace parley {
SendAuthorizer::~SendAuthorizer() = default;
Logger::~Logger() = default;
}  // namespace parley
