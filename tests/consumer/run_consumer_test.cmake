# Installs parley into a scratch prefix, moves the prefix elsewhere (both
# packages must be relocatable), then builds, links and runs an outside
# program against it twice: through find_package(parley) (CMakeLists.txt
# here) and through pkg-config (`pkg-config --cflags --libs parley`, with
# --static for a static library). For a shared library it also checks the
# SONAME and that libparley.so exports the public API and nothing else.
#
#   cmake -DWORK_DIR=... -DCONSUMER_SOURCE_DIR=... -DCXX=<c++ compiler>
#         -DPARLEY_SHARED=ON|OFF
#         (-DPARLEY_BINARY_DIR=<a built parley tree to install>
#          | -DPARLEY_SOURCE_DIR=<parley sources to configure and build
#                                 first, as a shared library>)
#         -P run_consumer_test.cmake
#
# With PARLEY_SOURCE_DIR, the build dir (WORK_DIR/parley-build) is kept
# between runs, so a rerun only rebuilds what changed; the rest of WORK_DIR
# is made anew.
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
  string(STRIP "${out}" out)
  if(out)
    message(STATUS "${out}")
  endif()
endfunction()

# `var` = stdout of the command (which must succeed), stripped.
function(capture var)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  string(STRIP "${out}" out)
  set(${var} "${out}" PARENT_SCOPE)
endfunction()

foreach(v WORK_DIR CONSUMER_SOURCE_DIR CXX)
  if(NOT ${v})
    message(FATAL_ERROR "run_consumer_test.cmake needs -D${v}=...")
  endif()
endforeach()

file(GLOB old LIST_DIRECTORIES true ${WORK_DIR}/*)
list(REMOVE_ITEM old ${WORK_DIR}/parley-build)
if(old)
  file(REMOVE_RECURSE ${old})
endif()
file(MAKE_DIRECTORY ${WORK_DIR})

# ---- The parley to install -------------------------------------------------
if(PARLEY_SOURCE_DIR)
  # A second parley build, shared, configured as a host would configure it:
  # no tests, benchmarks or examples; the libdir of a Debian multiarch
  # system, so parley.pc sits three levels below the prefix.
  set(PARLEY_BINARY_DIR ${WORK_DIR}/parley-build)
  run(${CMAKE_COMMAND} -S ${PARLEY_SOURCE_DIR} -B ${PARLEY_BINARY_DIR} -G Ninja
      -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release
      -DBUILD_SHARED_LIBS=ON -DCMAKE_INSTALL_LIBDIR=lib/x86_64-linux-gnu
      -DPARLEY_BUILD_TESTS=OFF -DPARLEY_BUILD_BENCH=OFF -DPARLEY_BUILD_EXAMPLES=OFF)
  # Configuring only the library needs neither Catch2 nor Google Benchmark.
  file(STRINGS ${PARLEY_BINARY_DIR}/CMakeCache.txt test_deps
       REGEX "^(Catch2|benchmark)_DIR:")
  if(test_deps)
    message(FATAL_ERROR "a library-only configure looked for test or "
                        "benchmark packages: ${test_deps}")
  endif()
  run(${CMAKE_COMMAND} --build ${PARLEY_BINARY_DIR} -j 2)
endif()
if(NOT PARLEY_BINARY_DIR)
  message(FATAL_ERROR "run_consumer_test.cmake needs -DPARLEY_BINARY_DIR or -DPARLEY_SOURCE_DIR")
endif()

# ---- Install, then move the installed tree ---------------------------------
set(staging ${WORK_DIR}/staging)
set(prefix ${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --install ${PARLEY_BINARY_DIR} --prefix ${staging})
file(RENAME ${staging} ${prefix})

file(GLOB_RECURSE pc_files ${prefix}/*/parley.pc)
list(LENGTH pc_files n)
if(NOT n EQUAL 1)
  message(FATAL_ERROR "expected one installed parley.pc, found: ${pc_files}")
endif()
get_filename_component(pc_dir ${pc_files} DIRECTORY)
get_filename_component(libdir ${pc_dir} DIRECTORY)
file(READ ${pc_files} pc_text)
string(FIND "${pc_text}" "${WORK_DIR}" at)
if(NOT at EQUAL -1)
  message(FATAL_ERROR "parley.pc names the install prefix (not relocatable):\n${pc_text}")
endif()
foreach(h export.h version.h engine.h)
  if(NOT EXISTS ${prefix}/include/parley/${h})
    message(FATAL_ERROR "parley/${h} was not installed")
  endif()
endforeach()

if(PARLEY_SHARED)
  set(lib ${libdir}/libparley.so)
  if(NOT EXISTS ${lib} OR NOT EXISTS ${libdir}/libparley.so.0)
    message(FATAL_ERROR "libparley.so and libparley.so.0 not installed in ${libdir}")
  endif()
  capture(dynamic readelf -d ${lib})
  if(NOT dynamic MATCHES "Library soname: \\[libparley\\.so\\.0\\]")
    message(FATAL_ERROR "libparley.so has no SONAME libparley.so.0:\n${dynamic}")
  endif()
  # libparley.so exports what the installed headers mark PARLEY_EXPORT and
  # nothing else: every dynamic symbol belongs to a marked class (its
  # members, typeinfo, vtable; nested classes included) or is a marked
  # function (free, or a member such as Options::Validate), and every marked
  # class and function is exported.
  file(GLOB headers ${prefix}/include/parley/*.h)
  list(REMOVE_ITEM headers ${prefix}/include/parley/export.h)  # the macro itself
  set(classes)
  set(functions)
  foreach(h IN LISTS headers)
    file(READ ${h} text)
    string(REGEX REPLACE "[\r\n\t ]+" " " text "${text}")  # declarations span lines
    string(REGEX MATCHALL "(class|struct) PARLEY_EXPORT [A-Za-z0-9_]+" marked "${text}")
    foreach(m IN LISTS marked)
      string(REGEX REPLACE "^.* " "" m "${m}")
      list(APPEND classes ${m})
    endforeach()
    string(REGEX MATCHALL "PARLEY_EXPORT [^(;{}]*[ *&][A-Za-z0-9_]+\\(" marked "${text}")
    foreach(m IN LISTS marked)
      string(REGEX REPLACE "^.*[ *&]([A-Za-z0-9_]+)\\($" "\\1" m "${m}")
      list(APPEND functions ${m})
    endforeach()
  endforeach()
  list(REMOVE_DUPLICATES functions)
  if(NOT classes OR NOT functions)
    message(FATAL_ERROR "found no PARLEY_EXPORT declarations in ${prefix}/include/parley")
  endif()
  list(JOIN classes "|" c)
  list(JOIN functions "|" f)
  set(public_api
    "^parley::(${c})::"
    "^(typeinfo|typeinfo name|vtable) for parley::(${c})(::[A-Za-z0-9_]+)*$"
    "^parley::([A-Za-z0-9_]+::)?(${f})(\\[abi:cxx11\\])?\\(")
  capture(symbols nm -D --defined-only -C --format=just-symbols ${lib})
  string(REPLACE "\n" ";" symbols "${symbols}")
  set(not_public)
  foreach(sym IN LISTS symbols)
    set(ok FALSE)
    foreach(re IN LISTS public_api)
      if(sym MATCHES "${re}")
        set(ok TRUE)
        break()
      endif()
    endforeach()
    if(NOT ok)
      list(APPEND not_public "${sym}")
    endif()
  endforeach()
  list(LENGTH symbols count)
  if(not_public)
    list(JOIN not_public "\n  " not_public)
    message(FATAL_ERROR "libparley.so exports symbols not marked PARLEY_EXPORT:\n  ${not_public}")
  endif()
  foreach(name IN LISTS classes functions)
    set(found FALSE)
    foreach(sym IN LISTS symbols)
      if(sym MATCHES "^parley::([A-Za-z0-9_]+::)?${name}(::|\\[abi:cxx11\\]\\(|\\()" OR
         sym MATCHES " for parley::${name}$")
        set(found TRUE)
        break()
      endif()
    endforeach()
    if(NOT found)
      message(FATAL_ERROR "libparley.so does not export ${name}, which the headers mark PARLEY_EXPORT")
    endif()
  endforeach()
  list(LENGTH classes nc)
  list(LENGTH functions nf)
  message(STATUS "libparley.so: SONAME libparley.so.0, ${count} exported symbols, all of "
                 "the ${nc} classes and ${nf} functions marked PARLEY_EXPORT")
endif()

# Nothing installed is on the loader's path: the shared library is found
# through LD_LIBRARY_PATH.
set(run_env ${CMAKE_COMMAND} -E env LD_LIBRARY_PATH=${libdir})

# ---- find_package(parley) --------------------------------------------------
run(${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${WORK_DIR}/cmake-build -G Ninja
    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/cmake-build)
run(${run_env} ${WORK_DIR}/cmake-build/consumer ${WORK_DIR}/db-cmake)

# ---- pkg-config ------------------------------------------------------------
set(pkg_config ${CMAKE_COMMAND} -E env PKG_CONFIG_PATH=${pc_dir} pkg-config)
if(PARLEY_SHARED)
  set(static_flag)
else()
  set(static_flag --static)
endif()
capture(cflags ${pkg_config} --cflags parley)
capture(libs ${pkg_config} ${static_flag} --libs parley)
message(STATUS "pkg-config --cflags parley: ${cflags}")
string(JOIN " " libs_command pkg-config ${static_flag} --libs parley)
message(STATUS "${libs_command}: ${libs}")
if(NOT PARLEY_SHARED AND NOT libs MATCHES "-lrocksdb")
  message(FATAL_ERROR "pkg-config --static --libs parley lacks the private dependencies: ${libs}")
endif()
separate_arguments(cflags UNIX_COMMAND "${cflags}")
separate_arguments(libs UNIX_COMMAND "${libs}")
set(pc_consumer ${WORK_DIR}/pkg-config-consumer)
run(${CXX} ${cflags} ${CONSUMER_SOURCE_DIR}/main.cc -o ${pc_consumer} ${libs})
capture(needed readelf -d ${pc_consumer})
if(PARLEY_SHARED AND NOT needed MATCHES "\\[libparley\\.so\\.0\\]")
  message(FATAL_ERROR "the pkg-config consumer does not load libparley.so.0:\n${needed}")
endif()
if(NOT PARLEY_SHARED AND needed MATCHES "libparley")
  message(FATAL_ERROR "the static pkg-config consumer loads a shared libparley:\n${needed}")
endif()
run(${run_env} ${pc_consumer} ${WORK_DIR}/db-pkg-config)
