# cmake --install: headers (with the generated export.h and version.h), the
# library, a CMake package (parley::parley) and a pkg-config file.
include(CMakePackageConfigHelpers)

install(TARGETS parley EXPORT parleyTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/parley
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_BINARY_DIR}/include/parley/export.h
              ${PROJECT_BINARY_DIR}/include/parley/version.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/parley)
install(EXPORT parleyTargets NAMESPACE parley::
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/parley)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/parleyConfig.cmake.in
  ${PROJECT_BINARY_DIR}/parleyConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/parley)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/parleyConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/parleyConfig.cmake
              ${PROJECT_BINARY_DIR}/parleyConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/parley)

# parley.pc is relocatable: its prefix is found from where the file lies
# (${pcfiledir}, <prefix>/<libdir>/pkgconfig), so the installed tree works
# wherever it is copied. The way up depends on the libdir ("lib": ../..,
# "lib/x86_64-linux-gnu": ../../..). An absolute libdir or includedir (one
# outside the prefix) is written as it is.
set(PARLEY_PC_DIR ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(PARLEY_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(PARLEY_PC_LIBDIR "${CMAKE_INSTALL_LIBDIR}")
else()
  file(RELATIVE_PATH PARLEY_PC_UP "/parley-prefix/${PARLEY_PC_DIR}" "/parley-prefix")
  string(REGEX REPLACE "/$" "" PARLEY_PC_UP "${PARLEY_PC_UP}")
  set(PARLEY_PC_PREFIX "\${pcfiledir}/${PARLEY_PC_UP}")
  set(PARLEY_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(PARLEY_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(PARLEY_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/parley.pc.in ${PROJECT_BINARY_DIR}/parley.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/parley.pc DESTINATION ${PARLEY_PC_DIR})
